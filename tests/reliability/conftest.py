"""Fixtures for the reliability tier: the serving app in-process, and the whole stack as real processes.

The stack is started by the same code as `python -m stack_runner up` (local/stack_runner), on free ports,
with tiny models, so these tests exercise the processes a developer runs.
"""

from __future__ import annotations

import pytest
from reliability.helpers import started_stack
from serve import create_app
from serve.config import ServeConfig
from serve.predictor import Predictor


@pytest.fixture(scope="session")
def serve_config(tiny_model_dir) -> ServeConfig:
    # Short answers: hostile-input tests care about status codes, not text.
    return ServeConfig(
        model_dir=tiny_model_dir,
        max_batch_size=8,
        max_queue=16,
        max_new_tokens_cap=8,
        default_max_new_tokens=2,
        max_input_tokens=256,
        torch_threads=1,
    )


@pytest.fixture(scope="session")
def serve_predictor(serve_config):
    predictor = Predictor(serve_config)
    predictor.load_now()
    assert predictor.ready, predictor.reason
    yield predictor
    predictor.engine.stop()


@pytest.fixture(scope="session")
def serve_app(serve_config, serve_predictor):
    return create_app(serve_config, predictor=serve_predictor)


@pytest.fixture
def serve_client(serve_app):
    return serve_app.test_client()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    with started_stack(tmp_path_factory.mktemp("stack"), tiny_model_dir) as running:
        yield running
