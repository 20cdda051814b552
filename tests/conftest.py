"""Shared fixtures and tiers. Default tier: offline, CPU, seconds. Markers: slow, distributed, docker, browser."""

from __future__ import annotations

import os
import shutil

import pytest
from fixtures.tiny_model import add_gguf, build_tiny_dolly_model, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama with a chat template (SmolLM2-like), built once per session. Treat as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def tiny_gguf_model_dir(tiny_model_dir, tmp_path_factory):
    """tiny_model_dir's model with an f32 GGUF beside its safetensors, named in manifest.json (the llama.cpp
    engine's artifact, logits as the transformers engine's). Read-only."""
    path = tmp_path_factory.mktemp("tiny-gguf-model") / "model"
    shutil.copytree(tiny_model_dir, path)
    add_gguf(path)
    return path


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has no chat template (Dolly / GPT-NeoX-like). Read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain-model"), chat_template=False)


@pytest.fixture(scope="session")
def tiny_dolly_model_dir(tmp_path_factory):
    """A tiny GPT-NeoX whose tokenizer mirrors databricks/dolly-v2's (see build_tiny_dolly_model). Read-only."""
    return build_tiny_dolly_model(tmp_path_factory.mktemp("tiny-dolly-model"))


def pytest_collection_modifyitems(config, items):
    # Docker and browser tests run in CI always. A developer who opts out of the system set-up (which needs
    # root) skips the Docker tier, and the browser tier too where that leaves no Chromium.
    if os.environ.get("SKIP_DOCKER_TESTS") == "1" and os.environ.get("CI") != "true":
        skipped = {"docker"} | (set() if shutil.which("chromium") else {"browser"})
        skip = pytest.mark.skip(reason="SKIP_DOCKER_TESTS=1 (local opt-out of the system set-up; never in CI)")
        for item in items:
            if skipped & set(item.keywords):
                item.add_marker(skip)


# Wall time per test file (setup, call and teardown together, so module fixtures such as a `docker compose up`
# count where they belong): CI's record of how long each step of the suite took, e.g. each Docker step.
_seconds_per_file: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    _seconds_per_file[path] = _seconds_per_file.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _seconds_per_file:
        return
    terminalreporter.section("time per test file")
    for path, seconds in sorted(_seconds_per_file.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {path}")
    terminalreporter.write_line(f"{sum(_seconds_per_file.values()):8.1f} s  total")
