"""Start the local Lambda path as real processes on loopback: fake SageMaker runtime, Lambda emulator
(awslambdaric inside), API Gateway emulator, static web server. Used by tests/local and tests/web."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fixtures.processes import stop_processes

REPO = Path(__file__).resolve().parents[2]
FUNCTIONS_DIR = Path(__file__).parent / "functions"
FAKE_CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "APIGW_", "LAMBDA_"))}
    env.update(FAKE_CREDS)
    env.update(extra)
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Processes:
    """Owns the processes it starts and stops them (SIGTERM, then SIGKILL) on exit."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str], port: int, health_path: str) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")
        popen = subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        proc = Proc(name, popen, f"http://127.0.0.1:{port}", log_path)
        self.procs.append(proc)
        _wait_ready(proc, health_path)
        return proc

    def stop(self) -> None:
        stop_processes(proc.popen for proc in reversed(self.procs))
        self.procs.clear()

    def fake_sagemaker(self, variant: str = "AllTraffic") -> Proc:
        port = free_port()
        script = str(Path(__file__).parent / "fake_sagemaker_runtime.py")
        args = [script, "--port", str(port), "--variant", variant]
        return self.start("fake-sagemaker", args, base_env(), port, "/")

    def lambda_emulator(
        self,
        *,
        sagemaker_url: str | None = None,
        handler: str = "qa_function.handler.handler",
        task_root: Path = REPO / "lambda" / "src",
        timeout_s: float = 29,
        max_concurrency: int = 2,
        name: str = "lambda",
        **function_env: str,
    ) -> Proc:
        port = free_port()
        env = base_env(ENDPOINT_NAME="qa-endpoint", **function_env)
        if sagemaker_url:
            env["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = sagemaker_url
        args = [
            "-m", "lambda_runtime_emulator", "--port", str(port), "--handler", handler,
            "--task-root", str(task_root), "--timeout", str(timeout_s),
            "--max-concurrency", str(max_concurrency),
        ]  # fmt: skip
        return self.start(name, args, env, port, "/_emulator/health")

    def apigw(self, lambda_url: str, *extra_args: str, name: str = "apigw") -> Proc:
        port = free_port()
        args = ["-m", "apigw_emulator", "--port", str(port), "--lambda-endpoint-url", lambda_url, *extra_args]
        return self.start(name, args, base_env(), port, "/_emulator/health")

    def static_site(self, api_base_url: str, port: int | None = None) -> Proc:
        port = port or free_port()
        args = [
            "-m",
            "static_site",
            "--port",
            str(port),
            "--root",
            str(REPO / "web"),
            "--api-base-url",
            api_base_url,
        ]
        return self.start("static-site", args, base_env(), port, "/index.html")


def _wait_ready(proc: Proc, health_path: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(proc.url + health_path, timeout=2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {timeout_s} s:\n{proc.log()}")


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> HttpReply:  # fmt: skip
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if isinstance(body, dict):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpReply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as e:
        return HttpReply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())
