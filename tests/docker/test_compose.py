"""`docker compose up` brings up the whole path in containers; a real browser asks the page; `down` leaves nothing.

It runs with the `ab` profile, so the endpoint has two production variants (the tuned model, 80 %, and the
untouched base model, 20 %) and the A/B path is exercised too.

The training job runs for real in the training image (short, via TRAIN_HYPERPARAMETERS), its model.tar.gz goes
through the S3 stand-in to the serving container, and the question travels page -> API Gateway emulator ->
Lambda -> endpoint emulator -> serving container, all in containers on one compose network."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from web.test_chat_page import ask as ask_in_page
from web.test_chat_page import browser, screenshot  # noqa: F401 - shared fixtures

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
PROJECT = "llm-finetune"
STAND_IN_BASE = "sagemaker-llm-finetune-base:bookworm"
SHORT_JOB = {"max_steps": "6", "eval_max_samples": "2", "eval_train_samples": "2", "eval_max_new_tokens": "16"}


def test_the_serving_containers_run_unprivileged_read_only_without_capabilities():
    """Read from compose.yaml itself (no Docker needed): both model servers run as the image's non-root user,
    on a read-only root filesystem with /tmp in memory, with every capability dropped and no privilege
    escalation, as tests/docker/test_hardened_serve.py shows the image serves."""
    import yaml

    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    for name in ("serve", "serve-base"):
        service = services[name]
        assert service.get("user") == "model-server", name
        assert service.get("read_only") is True, name
        assert [t.split(":")[0] for t in service.get("tmpfs", [])] == ["/tmp"], name
        assert service.get("cap_drop") == ["ALL"] and not service.get("cap_add"), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("privileged"), name
        assert all(volume.endswith(":ro") for volume in service["volumes"]), name


def compose(*args: str, env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["docker", "compose", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        pytest.fail(f"docker compose {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def leftovers() -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    found = {}
    for kind, command in (("containers", ["ps", "-a"]), ("volumes", ["volume", "ls"]), ("networks", ["network", "ls"])):
        out = subprocess.run(["docker", *command, "-q", "--filter", label], capture_output=True, text=True).stdout
        found[kind] = out.split()
    return found


def get(url: str, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except (urllib.error.URLError, OSError):
        return 0


@pytest.fixture(scope="module")
def stack(images):
    env = {
        **os.environ,
        "TRAIN_HYPERPARAMETERS": json.dumps(SHORT_JOB),
        "COMPOSE_PROFILES": "ab",
        "ENDPOINTS_FILE": "endpoints-ab.yaml",
        # Short answers: two model servers share this machine's cores and a question must end well
        # inside the Lambda's read timeout.
        "DEFAULT_MAX_NEW_TOKENS": "32",
    }
    base = os.environ.get("DOCKER_BASE_IMAGE") or STAND_IN_BASE
    env.update(LOCAL_BASE_IMAGE=base, TRAIN_BASE_IMAGE=base, SERVE_BASE_IMAGE=base)
    compose("down", "-v", "--remove-orphans", env=env, check=False)
    compose("build", "s3", env=env, timeout=900)  # the local stand-ins' image; train/serve come from `images`
    try:
        # `up -d` itself waits for the training job and the health checks the start order depends on.
        compose("up", "-d", "--no-build", env=env, timeout=1200)
        deadline = time.monotonic() + 900
        while get("http://127.0.0.1:8000/index.html") != 200 or get("http://127.0.0.1:3000/_emulator/health") != 200:
            lines = compose("ps", "-a", "--format", "json", env=env).stdout.splitlines()
            states = [json.loads(line) for line in lines if line.strip()]
            failed = [s["Service"] for s in states if s.get("State") == "exited" and s.get("ExitCode", 0) != 0]
            if failed or time.monotonic() > deadline:
                logs = compose("logs", "--no-color", "--tail", "40", env=env, check=False).stdout
                pytest.fail(f"the stack did not come up (failed: {failed}):\n{logs[-6000:]}")
            time.sleep(5)
        yield env
    finally:
        compose("down", "-v", "--remove-orphans", env=env, check=False, timeout=180)


def ask_api(payload: dict) -> dict:
    request = urllib.request.Request(
        "http://127.0.0.1:3000/prod/ask",
        method="POST",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_a_question_through_the_public_api(stack):
    body = ask_api({"question": "What does this toolkit do?", "target_variant": "tuned"})
    assert body["variant"] == "tuned" and isinstance(body["answer"], str) and body["answer"]


def test_ab_both_variants_answer_and_traffic_is_split(stack):
    """TargetVariant reaches each model; without it the 80/20 weights send some traffic to each."""
    assert ask_api({"question": "What is LoRA?", "target_variant": "base"})["variant"] == "base"
    one_token = {"question": "What is LoRA?", "parameters": {"max_new_tokens": 1}}
    variants = [ask_api(one_token)["variant"] for _ in range(40)]
    # 40 draws at 80/20: P(no "base" at all) = 0.8**40 ~ 1e-4, P(no "tuned") ~ 1e-28.
    assert set(variants) == {"tuned", "base"}, variants


def test_a_person_uses_the_page(stack, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get("http://localhost:8000/")
    entry = ask_in_page(browser, "How do I run the tests?")
    assert not entry.find_elements(By.CSS_SELECTOR, ".error"), entry.text
    assert re.search(r"Variant: (tuned|base)", entry.find_element(By.CSS_SELECTOR, ".meta").text)
    screenshot(browser, "compose-answer.png")


def test_down_leaves_nothing_behind(stack):
    compose("down", "-v", "--remove-orphans", env=stack, timeout=180)
    assert leftovers() == {"containers": [], "volumes": [], "networks": []}
