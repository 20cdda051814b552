"""Fixtures for the serving tests: a loaded tiny model (shared per session) and Flask apps around it."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve import create_app
from serve.config import ServeConfig
from serve.predictor import Predictor

SERVE = Path(__file__).resolve().parents[2] / "containers" / "serve" / "serve"
# The engines the HTTP contract is tested on: the same tests, either engine (SERVE_ENGINE).
ENGINES = ("transformers", "llamacpp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, tmp_path: Path, **env: str):
        self.port = free_port()
        base = tmp_path / "opt-ml"
        base.mkdir()
        (base / "model").symlink_to(model_dir)
        self.log_path = tmp_path / "server.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "SAGEMAKER_"))}
        environ.update(
            SAGEMAKER_BASE_DIR=str(base),
            SAGEMAKER_BIND_TO_PORT=str(self.port),
            SERVE_HOST="127.0.0.1",
            SERVE_TORCH_THREADS="1",
            **env,
        )
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVE)], env=environ, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.pings: list[int | None] = []

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                status = self.request("GET", "/ping", timeout=2)[0]
            except OSError:
                status = None  # not listening yet
            self.pings.append(status)
            if status == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"not ready after {timeout} s:\n{self.output()}")

    def request(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, dict | list):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def generate(self, inputs, **parameters):
        status, _, body = self.request("POST", "/invocations", {"inputs": inputs, "parameters": parameters})
        assert status == 200, body
        return json.loads(body)[0]

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    @classmethod
    @contextlib.contextmanager
    def ready(cls, model_dir: Path, tmp_path: Path, **env: str) -> Iterator[Server]:
        """A server that answers /ping 200 for the `with` block, stopped after it, whatever happened."""
        server = cls(model_dir, tmp_path, **env)
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def serve_process():
    """serve_process(model_dir, tmp_path, **env) -> Server: `containers/serve/serve` on a free loopback port."""
    return Server


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


@pytest.fixture(scope="session", params=ENGINES)
def predictor(request, tiny_model_dir, tiny_gguf_model_dir):
    """The tiny model loaded on each engine in turn: every test of the HTTP contract runs against both."""
    model_dir = tiny_gguf_model_dir if request.param == "llamacpp" else tiny_model_dir
    predictor = loaded_predictor(make_config(model_dir, engine=request.param))
    yield predictor
    predictor.engine.stop()


def reference_model(predictor: Predictor):
    """The predictor's model as a transformers model, whichever engine serves it (the llama.cpp engine's artifact
    holds the same weights as safetensors), to check replies against a direct forward pass."""
    if predictor.engine.runner.name == "transformers":
        return predictor.loaded.model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(predictor.config.model_dir).eval()


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
