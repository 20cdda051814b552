"""Fixtures for the AWS tier: the llmft-aws CLI, moto in server mode, a local Docker registry. All on loopback.

Nothing here may reach AWS: every subprocess gets fake credentials, `/dev/null` AWS config files and
AWS_ENDPOINT_URL pointing at a loopback server (moto, or a closed port when no AWS call is expected), and
a proxy on a closed port for anything else that tries to leave (loopback is exempt).

The CLI runs in the main venv, as the tests do: `run_cli` goes through the scripts/llmft-aws wrapper (a user's
path), the unit tests import llmft_aws in-process.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fixtures.processes import stop_processes
from lambda_fn.local_stack import FAKE_CREDS

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "scripts" / "llmft-aws"

CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard port: nothing listens, a stray call fails at once
FAKE_AWS = {
    **FAKE_CREDS,  # the Lambda tier's fake credentials and region, with every AWS call blocked on top
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ENDPOINT_URL": CLOSED_PORT_URL,
    "HTTP_PROXY": CLOSED_PORT_URL,
    "HTTPS_PROXY": CLOSED_PORT_URL,
    "NO_PROXY": "127.0.0.1,localhost",
}
AWS_ENV_PREFIXES = ("AWS_", "SAGEMAKER_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy")

# The Docker tier's fixtures (image build by content key, Docker checks), reused rather than copied:
# a conftest is not importable by name under --import-mode=importlib, so load it from its file.
_docker_spec = importlib.util.spec_from_file_location("_docker_tier_fixtures", REPO / "tests/docker/conftest.py")
_docker_fixtures = sys.modules.setdefault("_docker_tier_fixtures", importlib.util.module_from_spec(_docker_spec))
_docker_spec.loader.exec_module(_docker_fixtures)
docker_engine = _docker_fixtures.docker_engine
images = _docker_fixtures.images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any AWS settings of the machine, plus the fake ones, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(AWS_ENV_PREFIXES)}
    env.update(FAKE_AWS)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture(scope="session")
def run_cli():
    """Runs `scripts/llmft-aws ARGS` with a clean fake-AWS env; returns the CompletedProcess."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path = REPO):
        return subprocess.run(
            [str(CLI), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=clean_env(**(env or {}))
        )

    return run


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is up
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()}")


class Servers:
    """Child processes on loopback, always stopped (SIGTERM, then SIGKILL), logs kept for failures."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    free_port = staticmethod(free_port)

    def start(self, name: str, args: list[str], ready_url: str, env: dict | None = None) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        proc = subprocess.Popen(
            args,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(proc)
        wait_http(ready_url, proc, log)
        return proc

    def stop_all(self) -> None:
        stop_processes(self.procs)


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    servers = Servers(tmp_path_factory.mktemp("aws-servers"))
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def moto(servers) -> types.SimpleNamespace:
    """moto in server mode on loopback: the ECR, S3, SageMaker and Application Auto Scaling APIs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers.start(
        "moto",
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        f"{url}/moto-api/",
        env=clean_env(),
    )

    def client(service: str):
        import boto3

        return boto3.client(
            service,
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    return types.SimpleNamespace(url=url, client=client, env={"AWS_ENDPOINT_URL": url})


@pytest.fixture
def fake_aws(monkeypatch) -> None:
    """This process's env as clean_env() makes it for subprocesses (for in-process CLI tests)."""
    for key in list(os.environ):
        if key.startswith(AWS_ENV_PREFIXES):
            monkeypatch.delenv(key)
    for key, value in FAKE_AWS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def cli(fake_aws, capsys):
    """Calls llmft_aws's main(argv) in-process; returns (exit code, stdout, stderr)."""
    from llmft_aws.__main__ import main

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's own errors and --help
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
