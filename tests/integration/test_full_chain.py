"""The whole path with real processes, as a user meets it: a real browser on the chat page -> API Gateway
emulator -> Lambda (unmodified, under awslambdaric) -> SageMaker runtime endpoint emulator -> real serving
processes (tiny models) in two production variants. Started by the same code as `python -m stack_runner up`."""

from __future__ import annotations

import re

import pytest
from reliability.helpers import free_ports
from stack_runner.__main__ import Stack, ask, start_front, start_serving
from web.test_chat_page import ask as ask_in_page
from web.test_chat_page import browser, screenshot  # noqa: F401 - fixtures shared with the page's own tests

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, tiny_plain_model_dir):
    ports = free_ports()
    running = Stack(tmp_path_factory.mktemp("stack"))
    try:
        start_serving(running, "serve", tiny_model_dir, ports.serve)
        start_serving(running, "serve-base", tiny_plain_model_dir, ports.serve_base)
        running.wait_healthy("serve", f"http://127.0.0.1:{ports.serve}/ping", 120)
        running.wait_healthy("serve-base", f"http://127.0.0.1:{ports.serve_base}/ping", 120)
        start_front(running, ports, ab=True, api_key=None)
        yield ports
    finally:
        running.stop()


def test_both_variants_answer_through_the_public_api(stack):
    # An 80/20 split: 20 requests missed "base" about once in 90 runs (0.8^20); ask until both have answered,
    # up to 100 requests (a miss is then a 2e-10 event, or a broken split).
    seen: set[str] = set()
    for i in range(100):
        seen.add(ask(stack, f"What is SageMaker? ({i})")["variant"])
        if seen == {"tuned", "base"}:
            break
    assert seen == {"tuned", "base"}


def test_a_person_asks_on_the_page_and_reads_the_answer(stack, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{stack.web}/")
    entry = ask_in_page(browser, "What does this toolkit do?")
    assert not entry.find_elements(By.CSS_SELECTOR, ".error"), entry.text
    meta = entry.find_element(By.CSS_SELECTOR, ".meta").text
    assert "Variant: tuned" in meta or "Variant: base" in meta
    assert re.search(r"model [0-9.]+ m?s", meta), meta  # latency shown
    screenshot(browser, "full-chain-answer.png")
