"""Fixtures for the serving tests: a loaded tiny model (shared per session) and Flask apps around it."""

from __future__ import annotations

import logging

import pytest
from serve import create_app
from serve.config import ServeConfig
from serve.predictor import Predictor


def make_config(model_dir, **overrides) -> ServeConfig:
    settings = dict(
        model_dir=model_dir,
        max_batch_size=8,
        max_queue=40,
        max_new_tokens_cap=256,
        default_max_new_tokens=16,
        torch_threads=1,
        timeout_s=60,
    )
    settings.update(overrides)
    return ServeConfig(**settings)


def loaded_predictor(config: ServeConfig, **kwargs) -> Predictor:
    predictor = Predictor(config, **kwargs)
    predictor.load_now()
    assert predictor.ready, predictor.reason
    return predictor


@pytest.fixture(scope="session")
def predictor(tiny_model_dir):
    predictor = loaded_predictor(make_config(tiny_model_dir))
    yield predictor
    predictor.engine.stop()


@pytest.fixture
def make_config_for():
    """make_config_for(model_dir, **overrides) -> ServeConfig with test-sized limits."""
    return make_config


@pytest.fixture
def start_predictor():
    """start_predictor(config, loader=...) -> a loaded Predictor, stopped after the test."""
    started = []

    def start(config, **kwargs):
        started.append(loaded_predictor(config, **kwargs))
        return started[-1]

    yield start
    for predictor in started:
        predictor.engine.stop()


@pytest.fixture
def app(predictor):
    return create_app(predictor.config, predictor=predictor)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def access_lines():
    """The JSON access-log lines written during the test."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("serve.access")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
