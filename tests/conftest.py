"""Shared fixtures and tiers. Default tier: offline, CPU, seconds. Markers: slow, distributed, docker, browser."""

from __future__ import annotations

import os

import pytest
from fixtures.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama with a chat template (SmolLM2-like), built once per session. Treat as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has no chat template (Dolly / GPT-NeoX-like). Read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain-model"), chat_template=False)


def pytest_collection_modifyitems(config, items):
    # Docker tests run in CI always; a developer without an engine opts out explicitly.
    if os.environ.get("SKIP_DOCKER_TESTS") == "1" and os.environ.get("CI") != "true":
        skip = pytest.mark.skip(reason="SKIP_DOCKER_TESTS=1 (local opt-out; never honoured in CI)")
        for item in items:
            if "docker" in item.keywords:
                item.add_marker(skip)
