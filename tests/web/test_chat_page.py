"""The chat page in a real headless Chromium (Debian's, driven by Selenium through /usr/bin/chromedriver):
page (static_site) -> API Gateway emulator (API key, gateway CORS) -> Lambda emulator + awslambdaric ->
the unmodified handler -> a fake SageMaker runtime. Screenshots go to artifacts/ at the repository root.

Where the API key may go is checked against a "collector", a server that records every request it gets, reached
as http://evil.example (Chromium maps that name to loopback) or on another loopback port."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from lambda_fn.local_stack import REPO, Processes, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

API_KEY = "browser-test-key-0123456789"
ARTIFACTS = REPO / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EVIL_HOST = "evil.example"  # resolved to 127.0.0.1 by the browser fixture


@dataclass
class Site:
    url: str  # the page
    api_origin: str  # the origin of the API its config.js names


def store_key(driver, origin: str, key: str = API_KEY) -> None:
    """The key as the page keeps it once typed in: with the API origin it was entered for."""
    driver.execute_script(
        "sessionStorage.setItem('qa-chat.api-key', arguments[0])", json.dumps({"origin": origin, "key": key})
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The whole local path; returns the page URL."""
    processes = Processes(tmp_path_factory.mktemp("web-stack-logs"))
    web_port = free_port()
    origin = f"http://127.0.0.1:{web_port}"
    try:
        sagemaker = processes.fake_sagemaker(variant="tuned")
        function = processes.lambda_emulator(sagemaker_url=sagemaker.url, CORS_ALLOW_ORIGINS=origin)
        gateway = processes.apigw(function.url, "--api-keys", API_KEY, "--gateway-responses-allow-origin", origin)
        processes.static_site(api_base_url=f"{gateway.url}/prod", port=web_port)
        yield Site(url=origin + "/", api_origin=gateway.url)
    finally:
        processes.stop()


@dataclass
class Collector:
    """Answers any POST with an answer and records what it was sent; answers CORS preflights for any origin."""

    port: int
    requests: list[dict] = field(default_factory=list)


@pytest.fixture(scope="module")
def collector():
    record = Collector(port=0)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _cors(self):
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", "content-type, x-api-key")
            self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")

        def do_OPTIONS(self):
            self.send_response(204)
            self._cors()
            self.end_headers()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            record.requests.append({k.lower(): v for k, v in self.headers.items()})
            body = json.dumps({"answer": "collected", "variant": "collector", "latency_ms": 1}).encode()
            self.send_response(200)
            self._cors()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield record
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def open_site():
    """The page with the stand-in's CSP for an API known only at run time (connect-src http: https:), so what
    is checked here is the page's own rule, not the CSP (production's CSP is a second fence: test_infra.py).
    Its config.js names the discard port, where nothing answers."""
    from flask import Response, request
    from static_site.app import create_app
    from werkzeug.serving import make_server

    app = create_app(REPO / "web")

    @app.before_request
    def config_js():
        if request.path == "/config.js":
            js = 'window.QA_CONFIG = {"apiBaseUrl": "http://127.0.0.1:9/prod"};'
            return Response(js, content_type="text/javascript; charset=utf-8")
        return None

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Site(url=f"http://127.0.0.1:{server.server_port}/", api_origin="http://127.0.0.1:9")
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            "Chromium is not installed: `make test` installs it (scripts/setup.d/10-browser.sh, as root); "
            "or opt out locally with SKIP_DOCKER_TESTS=1"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1000,900", f"--user-data-dir={profile}",
        f"--host-resolver-rules=MAP {EVIL_HOST} 127.0.0.1",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def ask(driver, text: str):
    """Type a question and press Enter (keyboard only); returns the newest transcript entry once settled."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    count = len(driver.find_elements(By.CSS_SELECTOR, "#transcript .entry"))
    box = driver.find_element(By.ID, "question")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)

    def settled(d):
        entries = d.find_elements(By.CSS_SELECTOR, "#transcript .entry")
        if len(entries) <= count:
            return False
        newest = entries[-1]
        return newest if not newest.find_elements(By.CSS_SELECTOR, ".pending") else False

    return WebDriverWait(driver, 30).until(settled)


def test_answer_variant_and_latency_are_shown(site, browser):
    from selenium.webdriver.common.by import By

    browser.get(site.url)
    assert browser.title == "Ask the model"
    assert browser.switch_to.active_element.get_attribute("id") == "question"  # focus starts in the box

    # No key yet: the gateway's 403 is readable cross-origin and explained in plain words.
    entry = ask(browser, "What is Amazon SageMaker?")
    error = entry.find_element(By.CSS_SELECTOR, ".error").text
    assert "API key is missing or not accepted (403)" in error
    assert browser.find_element(By.ID, "question").get_attribute("value") == "What is Amazon SageMaker?"

    # Enter the key under Connection settings, then ask again with the keyboard.
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    stored = json.loads(browser.execute_script("return sessionStorage.getItem('qa-chat.api-key')"))
    assert stored == {"origin": site.api_origin, "key": API_KEY}  # kept with the API it was typed for
    browser.find_element(By.ID, "question").clear()
    entry = ask(browser, "What is Amazon SageMaker?")

    answer = entry.find_element(By.CSS_SELECTOR, ".answer").text
    meta = entry.find_element(By.CSS_SELECTOR, ".meta").text
    assert "SageMaker is a fully managed service" in answer
    assert "Variant: tuned" in meta
    assert "model " in meta and "round trip " in meta
    assert browser.switch_to.active_element.get_attribute("id") == "question"  # focus returns to the box
    assert browser.find_element(By.ID, "question").get_attribute("value") == ""
    assert browser.find_element(By.ID, "transcript").get_attribute("aria-live") == "polite"
    assert screenshot(browser, "web-chat-answer.png").stat().st_size > 0


def test_model_failure_is_explained_in_plain_words(site, browser):
    from selenium.webdriver.common.by import By

    if not browser.current_url.startswith(site.url):
        browser.get(site.url)
    store_key(browser, site.api_origin)
    browser.get(site.url)  # the key survives a reload in the same tab
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == API_KEY

    entry = ask(browser, "[model-error] Why does this fail?")
    error = entry.find_element(By.CSS_SELECTOR, ".error").text
    assert error == "The model endpoint is not available right now (502)."
    screenshot(browser, "web-chat-error.png")

    # The model server gave up on the question (it expired in its queue): a 504, not an empty answer.
    browser.find_element(By.ID, "question").clear()
    entry = ask(browser, "[finish=timeout] Nobody got to this one")
    assert entry.find_element(By.CSS_SELECTOR, ".error").text == "The model took too long to answer (504)."


def test_empty_question_is_caught_on_the_page(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site.url)
    box = browser.find_element(By.ID, "question")
    box.send_keys("   ")
    box.send_keys(Keys.ENTER)
    assert browser.find_element(By.ID, "form-error").text == "Type a question first."
    assert box.get_attribute("aria-invalid") == "true"
    assert browser.find_elements(By.CSS_SELECTOR, "#transcript .entry") == []


def test_api_query_parameter_overrides_config(site, browser):
    from selenium.webdriver.common.by import By

    browser.get(site.url + "?api=http://127.0.0.1:9/elsewhere/")
    assert browser.find_element(By.ID, "api-url").get_attribute("textContent") == "http://127.0.0.1:9/elsewhere"
    entry = ask(browser, "Anyone there?")
    assert (
        "Could not reach the API at http://127.0.0.1:9/elsewhere" in entry.find_element(By.CSS_SELECTOR, ".error").text
    )


def test_pending_state_and_escape_to_cancel(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    store_key(browser, site.api_origin)
    browser.get(site.url)
    box = browser.find_element(By.ID, "question")
    box.send_keys("[sleep=1.5] A slow question")
    box.send_keys(Keys.ENTER)
    pending = WebDriverWait(browser, 5).until(lambda d: d.find_element(By.CSS_SELECTOR, "#transcript .pending"))
    assert pending.text == "Waiting for the model…"
    assert browser.find_element(By.ID, "send").get_attribute("disabled") is not None
    assert browser.find_element(By.ID, "ask-form").get_attribute("aria-busy") == "true"
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "elapsed").text.endswith(" s"))
    screenshot(browser, "web-chat-pending.png")
    entry = WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript .answer"))
    assert entry and browser.find_element(By.ID, "ask-form").get_attribute("aria-busy") == "false"

    box = browser.find_element(By.ID, "question")
    box.send_keys("[sleep=3] Never mind")
    box.send_keys(Keys.ENTER)
    WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript .pending"))
    box.send_keys(Keys.ESCAPE)
    error = WebDriverWait(browser, 5).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript .entry:last-child .error")
    )
    assert error[0].text == "Cancelled. The question was not answered."
    assert browser.switch_to.active_element.get_attribute("id") == "question"


# --- where the API key may go -------------------------------------------------------------------------


def type_key(driver, key: str = API_KEY) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)


def test_a_link_cannot_point_the_page_and_its_key_at_another_host(open_site, collector, browser):
    """A phishing link `?api=https://evil.example/...` used to get every question and the stored API key."""
    from selenium.webdriver.common.by import By

    browser.get(open_site.url)
    type_key(browser)  # kept for the page's own API
    collector.requests.clear()
    browser.get(open_site.url + f"?api=http://{EVIL_HOST}:{collector.port}/prod")
    refusal = browser.find_element(By.ID, "form-error").text  # shown until the next question is typed
    screenshot(browser, "web-chat-foreign-api-refused.png")
    ask(browser, "Where does my key go?")

    assert collector.requests == [], "the page sent a request to the host the link named"
    assert browser.find_element(By.ID, "api-url").get_attribute("textContent") == "http://127.0.0.1:9/prod"
    assert "not on this computer" in refusal


def test_the_key_is_never_sent_to_an_api_it_was_not_entered_for(open_site, collector, browser):
    from selenium.webdriver.common.by import By

    browser.get(open_site.url)
    type_key(browser)  # for http://127.0.0.1:9
    collector.requests.clear()
    browser.get(open_site.url + f"?api=http://127.0.0.1:{collector.port}/prod")  # a local API: accepted
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""
    entry = ask(browser, "Which key do you get?")

    assert entry.find_element(By.CSS_SELECTOR, ".answer").text.endswith("collected")  # it did go there
    assert len(collector.requests) == 1 and "x-api-key" not in collector.requests[0]

    type_key(browser, "a-key-for-the-collector-0123")  # typed for this API: sent to it
    browser.find_element(By.ID, "question").click()
    ask(browser, "And now?")
    assert collector.requests[-1]["x-api-key"] == "a-key-for-the-collector-0123"
    browser.get(open_site.url)  # back to the page's own API: that key stays behind
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""


@pytest.mark.parametrize(
    ("api", "accepted"),
    [
        ("http://127.0.0.1:9/a", "http://127.0.0.1:9/a"),
        ("http://127.1:9/b/", "http://127.0.0.1:9/b"),  # the browser's own reading of the host decides
        ("http://localhost:9/c", "http://localhost:9/c"),
        ("http://[::1]:9/d", "http://[::1]:9/d"),
        ("http://localhost.evil.example/e", None),
        ("http://127.0.0.1.evil.example/f", None),
        ("https://abc.execute-api.us-east-1.amazonaws.com/prod", None),
        ("//evil.example/g", None),
        ("javascript:alert(1)", None),
    ],
)
def test_only_a_loopback_api_is_taken_from_the_page_address(open_site, browser, api, accepted):
    from urllib.parse import quote

    from selenium.webdriver.common.by import By

    browser.get(open_site.url + "?api=" + quote(api, safe=""))
    shown = browser.find_element(By.ID, "api-url").get_attribute("textContent")
    assert shown == (accepted or "http://127.0.0.1:9/prod")
    refused = "not on this computer" in browser.find_element(By.ID, "form-error").text
    assert refused is (accepted is None)


# --- sources under an answer ----------------------------------------------------------------------------


@dataclass
class FakeApi:
    """The public API as the page sees it: answers every POST with `reply` and records the JSON bodies."""

    port: int
    reply: dict = field(default_factory=dict)
    bodies: list[dict] = field(default_factory=list)


@pytest.fixture(scope="module")
def fake_api():
    api = FakeApi(port=0)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _cors(self):
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", "content-type, x-api-key")
            self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")

        def do_OPTIONS(self):
            self.send_response(204)
            self._cors()
            self.end_headers()

        def do_POST(self):
            api.bodies.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0")))))
            body = json.dumps(api.reply).encode()
            self.send_response(200)
            self._cors()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield api
    server.shutdown()
    server.server_close()


MARKUP_TITLE = '<img src=x onerror="window.__xss = 1">What is <b>SageMaker</b>?'
MARKUP_SOURCE = "<script>window.__xss = 2</script>faq.csv#3"


def test_sources_are_listed_collapsed_under_the_answer_as_text(open_site, fake_api, browser):
    from selenium.webdriver.common.by import By

    fake_api.reply = {
        "answer": "A fully managed machine learning service.",
        "variant": "tuned",
        "latency_ms": 12.5,
        "sources": [
            {"title": "What is Amazon SageMaker?", "source": "faq.csv#1"},
            {"title": MARKUP_TITLE, "source": MARKUP_SOURCE},
            {"title": 42, "source": "not shown: the title is not text"},
            "not shown: not an object",
        ],
    }
    browser.get(open_site.url + f"?api=http://127.0.0.1:{fake_api.port}/prod")
    entry = ask(browser, "What is SageMaker?")

    # Under the answer, above the variant/latency line, closed.
    parts = [e.get_attribute("class") for e in entry.find_elements(By.XPATH, "./*")]
    assert parts == ["question", "answer", "sources", "meta"]
    details = entry.find_element(By.CSS_SELECTOR, "details.sources")
    assert details.get_attribute("open") is None
    summary = details.find_element(By.TAG_NAME, "summary")
    assert summary.text == "Sources (2)"
    items = details.find_elements(By.TAG_NAME, "li")
    assert len(items) == 2 and not items[0].is_displayed()

    # The model's strings are text: nothing of them became an element, no handler ran.
    text = [
        (li.find_element(By.CLASS_NAME, "source-title").get_attribute("textContent"),
         li.find_element(By.CLASS_NAME, "source-ref").get_attribute("textContent"))
        for li in items
    ]  # fmt: skip
    assert text == [("What is Amazon SageMaker?", "faq.csv#1"), (MARKUP_TITLE, MARKUP_SOURCE)]
    assert entry.find_elements(By.CSS_SELECTOR, "img, script, b") == []
    assert browser.execute_script("return window.__xss") is None

    summary.click()  # opens with a click (or Enter / Space on the focused summary)
    assert details.get_attribute("open") is not None and items[1].is_displayed()
    assert MARKUP_TITLE in items[1].text
    screenshot(browser, "web-chat-sources.png")
    assert browser.execute_script("return window.__xss") is None


def test_no_sources_no_details_and_retrieval_can_be_turned_off(open_site, fake_api, browser):
    from selenium.webdriver.common.by import By

    browser.get(open_site.url + f"?api=http://127.0.0.1:{fake_api.port}/prod")
    fake_api.bodies.clear()
    for reply_sources in ([], None):  # retrieval found nothing; a model without an index
        fake_api.reply = {"answer": "From memory.", "variant": "tuned", "latency_ms": 3}
        if reply_sources is not None:
            fake_api.reply["sources"] = reply_sources
        entry = ask(browser, "Anything?")
        assert entry.find_element(By.CSS_SELECTOR, ".answer").text.endswith("From memory.")
        assert entry.find_elements(By.CSS_SELECTOR, "details") == []
    assert fake_api.bodies == [{"question": "Anything?"}] * 2  # retrieval is the API's default: not sent

    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    checkbox = browser.find_element(By.ID, "retrieval")
    assert checkbox.is_selected()
    checkbox.click()
    browser.find_element(By.ID, "question").click()
    ask(browser, "Without sources?")
    assert fake_api.bodies[-1] == {"question": "Without sources?", "retrieval": False}
