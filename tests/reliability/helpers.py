"""The stack as real processes on loopback, with the knobs reliability tests turn (workers, Lambda concurrency,
API keys, throttling); process handling is stack_runner's own `Stack`."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from stack_runner.__main__ import REPO, Ports, Stack, endpoint_config, start_gateway_path

ENDPOINT_NAME = "faq-assistant"
SERVE = REPO / "containers" / "serve" / "serve"
# Paths and markers that must never reach a caller: stack traces and where the code lives.
LEAK_MARKERS = ("Traceback", 'File "', "/work/", "site-packages", str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports() -> Ports:
    return Ports(
        web=free_port(),
        apigw=free_port(),
        lambda_runtime=free_port(),
        runtime_emulator=free_port(),
        serve=free_port(),
        serve_base=free_port(),
        s3=free_port(),
    )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self):
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict | None = None,
    timeout: float = 60,
) -> Reply:
    """One HTTP request on a fresh connection; never raises for an HTTP status."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, data, time.perf_counter() - started
        )
    finally:
        conn.close()


def assert_clean_error(reply: Reply) -> dict:
    """A JSON error body with no stack trace or file path in it."""
    assert reply.headers.get("content-type", "").startswith("application/json"), reply
    text = reply.body.decode("utf-8", "replace")
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} leaked to the caller: {text[:500]}"
    return json.loads(reply.body)


@dataclass
class RunningStack:
    """serve -> endpoint emulator -> Lambda emulator -> API Gateway emulator, each a process."""

    workdir: Path
    ports: Ports
    stack: Stack = field(init=False)
    serve_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stack = Stack(self.workdir)

    # ----- serving -----

    def start_serving(self, model_dir: Path, **env: str) -> None:
        base = self.workdir / "endpoint"
        base.mkdir(parents=True, exist_ok=True)
        if not (base / "model").exists():
            (base / "model").symlink_to(Path(model_dir).resolve(), target_is_directory=True)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "SAGEMAKER_"))}
        self.serve_env = {
            **clean,
            "SAGEMAKER_BASE_DIR": str(base),
            "SAGEMAKER_BIND_TO_PORT": str(self.ports.serve),
            "SERVE_HOST": "127.0.0.1",
            "SERVE_TORCH_THREADS": "1",
            # The caps stay the defaults the Lambda validates against; a small context keeps every answer short.
            "SERVE_DEFAULT_MAX_NEW_TOKENS": "8",
            "SERVE_MAX_INPUT_TOKENS": "128",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.stack.start("serve", [sys.executable, str(SERVE)], self.serve_env)
        self.stack.wait_healthy("serve", f"http://127.0.0.1:{self.ports.serve}/ping", 120)

    def stop_serving(self, sig: int = signal.SIGTERM) -> None:
        process = dict(self.stack.processes)["serve"]
        os.killpg(process.pid, sig)
        process.wait(timeout=40)
        self.stack.processes = [(n, p) for n, p in self.stack.processes if n != "serve"]

    def restart_serving(self) -> None:
        self.stack.start("serve", [sys.executable, str(SERVE)], self.serve_env)
        self.stack.wait_healthy("serve", f"http://127.0.0.1:{self.ports.serve}/ping", 120)

    def serve_pid(self) -> int:
        return dict(self.stack.processes)["serve"].pid

    # ----- the front: endpoint emulator, Lambda, API Gateway -----

    def start_front(
        self,
        *,
        lambda_concurrency: int = 4,
        api_key: str | None = None,
        throttle: tuple[float, int] | None = None,
        allow_origin: str = "http://127.0.0.1:8000",
    ) -> None:
        config = endpoint_config(self.ports, ab=False)
        config["endpoints"] = {ENDPOINT_NAME: config["endpoints"][ENDPOINT_NAME]}
        throttling = ("--throttle-rate", str(throttle[0]), "--throttle-burst", str(throttle[1])) if throttle else ()
        start_gateway_path(
            self.stack,
            self.ports,
            config,
            lambda_concurrency=lambda_concurrency,
            allow_origin=allow_origin,
            apigw_args=(*(("--api-keys", api_key) if api_key else ()), *throttling),
            prewarm=False,
        )

    # ----- calls -----

    def ask(self, question: str, headers: dict | None = None, timeout: float = 60, **extra) -> Reply:
        return request(self.ports.apigw, "POST", "/prod/ask", {"question": question, **extra}, headers, timeout)

    def invoke(self, body: dict, timeout: float = 60) -> Reply:
        """InvokeEndpoint through the endpoint emulator (what the Lambda's boto3 client sends)."""
        return request(
            self.ports.runtime_emulator, "POST", f"/endpoints/{ENDPOINT_NAME}/invocations", body, timeout=timeout
        )

    def direct(self, body: dict, timeout: float = 60) -> Reply:
        return request(self.ports.serve, "POST", "/invocations", body, timeout=timeout)

    def log(self, name: str) -> str:
        path = self.stack.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self.stack.stop(grace=20)


@contextmanager
def started_stack(workdir: Path, model_dir: Path):
    """serve (gunicorn, tiny model) -> endpoint emulator -> Lambda emulator -> API Gateway emulator, stopped after."""
    running = RunningStack(workdir, free_ports())
    try:
        running.start_serving(model_dir)
        running.start_front()
        yield running
    finally:
        running.stop()
