"""The chat page in a real headless Chromium (Debian's, driven by Selenium through /usr/bin/chromedriver):
page (static_site) -> API Gateway emulator (API key, gateway CORS) -> Lambda emulator + awslambdaric ->
the unmodified handler -> a fake SageMaker runtime. Screenshots go to artifacts/ at the repository root."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from lambda_fn.local_stack import REPO, Processes, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

API_KEY = "browser-test-key-0123456789"
ARTIFACTS = REPO / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


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
        yield origin + "/"
    finally:
        processes.stop()


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

    browser.get(site)
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
    assert browser.execute_script("return sessionStorage.getItem('qa-chat.api-key')") == API_KEY
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

    if not browser.current_url.startswith(site):
        browser.get(site)
    browser.execute_script(f"sessionStorage.setItem('qa-chat.api-key', '{API_KEY}')")
    browser.get(site)  # the key survives a reload in the same tab
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == API_KEY

    entry = ask(browser, "[model-error] Why does this fail?")
    error = entry.find_element(By.CSS_SELECTOR, ".error").text
    assert error == "The model endpoint is not available right now (502)."
    screenshot(browser, "web-chat-error.png")


def test_empty_question_is_caught_on_the_page(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site)
    box = browser.find_element(By.ID, "question")
    box.send_keys("   ")
    box.send_keys(Keys.ENTER)
    assert browser.find_element(By.ID, "form-error").text == "Type a question first."
    assert box.get_attribute("aria-invalid") == "true"
    assert browser.find_elements(By.CSS_SELECTOR, "#transcript .entry") == []


def test_api_query_parameter_overrides_config(site, browser):
    from selenium.webdriver.common.by import By

    browser.get(site + "?api=http://127.0.0.1:9/elsewhere/")
    assert browser.find_element(By.ID, "api-url").get_attribute("textContent") == "http://127.0.0.1:9/elsewhere"
    entry = ask(browser, "Anyone there?")
    assert (
        "Could not reach the API at http://127.0.0.1:9/elsewhere" in entry.find_element(By.CSS_SELECTOR, ".error").text
    )


def test_pending_state_and_escape_to_cancel(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script(f"sessionStorage.setItem('qa-chat.api-key', '{API_KEY}')")
    browser.get(site)
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
