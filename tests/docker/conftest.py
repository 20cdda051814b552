"""Fixtures for the Docker tier: the real images, built once per content, and real containers on loopback.

The images are built by scripts/build-images.sh, which reuses an image whose content key matches, so a
second session (or CI re-run) costs seconds. The base image is the local stand-in built by
docker/build-base.sh when it exists (no registry here), else the Dockerfiles' public defaults.
Env: DOCKER_BASE_IMAGE (base to build on), TORCH_WHEEL_DIR (local torch wheel, default /opt/wheels).
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import shutil
import subprocess
import time
import types
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures.faq_csv import faq_rows

REPO_ROOT = Path(__file__).resolve().parents[2]

FAQ_ROWS = [
    ("What is Amazon SageMaker?", "A managed service to build, train and deploy machine learning models."),
    (
        "What is a training job?",
        "A managed run of your training container on instances SageMaker provisions.",
    ),
    ("Where does the model go?", "The container writes it to /opt/ml/model; SageMaker uploads it to S3."),
    ("What is an endpoint?", "A managed HTTPS service that serves your model for real-time inference."),
    ("How do I pay?", "By the second for the instances your jobs and endpoints use."),
    ("What is a channel?", "A named input whose data SageMaker mounts under /opt/ml/input/data."),
    ("What is BYOC?", "Bringing your own container image that follows SageMaker's contract."),
    ("What port does serving use?", "The container listens on port 8080 for /ping and /invocations."),
    ("What does /ping do?", "It tells SageMaker the container is healthy and ready for requests."),
    ("What is a spot instance?", "Spare capacity at a discount that may be reclaimed with short notice."),
    ("What are checkpoints?", "Saved training state in /opt/ml/checkpoints so a job can resume."),
    ("What is LoRA?", "Low-rank adapters: a few small matrices trained instead of all weights."),
]


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def image_exists(image: str) -> bool:
    return docker("image", "inspect", image, check=False, timeout=30).returncode == 0


def inspect(obj: str) -> dict:
    return json.loads(docker("inspect", obj).stdout)[0]


def opt_ml_tree(
    root: Path, hyperparameters: dict[str, str], channels=("train",), rows: list[tuple[str, str]] = FAQ_ROWS
) -> Path:
    """/opt/ml as SageMaker lays it out for a one-host File-mode job, with a small FAQ CSV as `train`."""
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"})
    )
    (config / "inputdataconfig.json").write_text(
        json.dumps({ch: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"} for ch in channels})
    )
    train = root / "input" / "data" / "train"
    train.mkdir(parents=True)
    with (train / "faq.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        writer.writerows(rows)
    for sub in ("model", "output/data", "checkpoints"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def faq_subset(n: int) -> list[tuple[str, str]]:
    """The first n rows of the generated FAQ (tests/fixtures/faq_csv.py: FAQ-length answers), stripped."""
    return [(q.strip(), a.strip()) for q, a in faq_rows(n)]


def host_port(container: str, port: int = 8080) -> int:
    out = docker("port", container, f"{port}/tcp").stdout.strip().splitlines()[0]
    return int(out.rsplit(":", 1)[1])


def wait_for_ping(container: str, port: int, timeout_s: float = 180) -> float:
    """Seconds until GET /ping answers 200; fails with the container's logs if it exits or never does."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not inspect(container)["State"]["Running"]:
            raise AssertionError(f"container {container} exited before /ping answered:\n{logs(container)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"/ping not 200 within {timeout_s} s:\n{logs(container)}")


def logs(container: str) -> str:
    proc = docker("logs", "--tail", "80", container, check=False)
    return proc.stdout + proc.stderr


def post(port: int, path: str, body: dict, timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


STAND_IN_BASE = "sagemaker-llm-finetune-base:bookworm"


_TIMINGS = pytest.StashKey[dict]()


def record_timing(config, what: str, seconds: float) -> None:
    config.stash.setdefault(_TIMINGS, {})[what] = seconds


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # CI reports how long each Docker step took; pytest would otherwise swallow these behind passing tests.
    timings = config.stash.get(_TIMINGS, {})
    if timings:
        terminalreporter.section("docker timings")
        for what, seconds in timings.items():
            terminalreporter.line(f"{what}: {seconds:.0f} s")


TRAIN_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def docker_engine() -> None:
    if shutil.which("docker") is None or docker("info", check=False, timeout=30).returncode != 0:
        pytest.fail(
            "No Docker engine answers `docker info`. `make test` starts one (scripts/setup.d/20-docker.sh, as root), "
            "or opt out locally with SKIP_DOCKER_TESTS=1 (never honoured in CI)."
        )


@pytest.fixture(scope="session")
def docker_cli(docker_engine, pytestconfig) -> types.SimpleNamespace:
    """The docker CLI helpers for test modules (conftest is not importable under --import-mode=importlib)."""
    return types.SimpleNamespace(
        run=docker,
        inspect=inspect,
        logs=logs,
        opt_ml_tree=opt_ml_tree,
        run_training=run_training,
        faq_subset=faq_subset,
        record_timing=lambda what, seconds: record_timing(pytestconfig, what, seconds),
    )


@dataclass(frozen=True)
class Images:
    train: str
    serve: str


@pytest.fixture(scope="session")
def images(docker_engine, tmp_path_factory, pytestconfig) -> Images:
    """Both images, built (or reused by content key) once per session."""
    base = os.environ.get("DOCKER_BASE_IMAGE") or (STAND_IN_BASE if image_exists(STAND_IN_BASE) else "")
    wheels = os.environ.get("TORCH_WHEEL_DIR", "/opt/wheels")
    cmd = [str(REPO_ROOT / "scripts" / "build-images.sh")]
    if base:
        cmd += ["--base", base]
    if any(Path(wheels).glob("torch-*.whl")):
        cmd += ["--wheels", wheels]
    log = tmp_path_factory.mktemp("docker-build") / "build.log"
    t0 = time.monotonic()
    with log.open("w") as stderr:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        pytest.fail(f"image build failed (exit {proc.returncode}), last lines of {log}:\n{tail}")
    record_timing(pytestconfig, "build (or reuse) both images", time.monotonic() - t0)
    train, serve = proc.stdout.split()
    return Images(train=train, serve=serve)


@dataclass(frozen=True)
class TrainingRun:
    """One `docker run IMAGE train` against a mounted /opt/ml tree, and what it left there."""

    exit_code: int
    logs: str
    opt_ml: Path
    seconds: float

    @property
    def model_dir(self) -> Path:
        return self.opt_ml / "model"

    def explain(self) -> str:
        failure = self.opt_ml / "output" / "failure"
        reason = failure.read_text(errors="replace") if failure.exists() else "(no /opt/ml/output/failure)"
        tail = "\n".join(self.logs.splitlines()[-40:])
        return f"exit {self.exit_code} after {self.seconds:.0f} s; failure: {reason}\nlast log lines:\n{tail}"


TINY_HYPERPARAMETERS = {
    # SDK v3 style: plain strings. Small enough for seconds on a CPU.
    "max_steps": "2",
    "eval_max_samples": "2",
    "eval_train_samples": "2",
    "eval_max_new_tokens": "8",
}


def run_training(image: str, opt_ml: Path, model_dir: Path | None, name: str) -> TrainingRun:
    mounts = ["-v", f"{opt_ml}:/opt/ml"]
    if model_dir is not None:
        # The base model arrives as the `model` channel, read-only, as SageMaker would mount it.
        mounts += ["-v", f"{model_dir}:/opt/ml/input/data/model:ro"]
    t0 = time.monotonic()
    proc = docker("run", "--rm", "--name", name, *mounts, image, "train", check=False, timeout=TRAIN_TIMEOUT_S)
    return TrainingRun(proc.returncode, proc.stdout + proc.stderr, opt_ml, time.monotonic() - t0)


@pytest.fixture(scope="session")
def training_run(images, tiny_model_dir, tmp_path_factory, pytestconfig) -> TrainingRun:
    """The training image fine-tunes the tiny model on a small CSV; shared by the train and serve tests."""
    opt_ml = opt_ml_tree(tmp_path_factory.mktemp("opt-ml"), TINY_HYPERPARAMETERS, channels=("train", "model"))
    run = run_training(images.train, opt_ml, Path(tiny_model_dir), name=f"llmft-test-train-{os.getpid()}")
    record_timing(pytestconfig, "docker run train (tiny model)", run.seconds)
    return run


@pytest.fixture(scope="session")
def artifact_dir(training_run) -> Path:
    if training_run.exit_code != 0 or not (training_run.model_dir / "manifest.json").exists():
        pytest.fail("no artifact to serve: the training container failed:\n" + training_run.explain())
    return training_run.model_dir


@dataclass(frozen=True)
class ServingContainer:
    """A detached `docker run IMAGE serve` published on a free loopback port."""

    name: str
    port: int

    def post(self, path: str, body: dict, timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
        return post(self.port, path, body, timeout)

    def stream(self, body: dict, timeout: float = 120) -> tuple[int, dict[str, str], list[bytes]]:
        """POST /invocations and collect the body chunk by chunk as the server flushes it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/invocations", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            chunks = []
            while chunk := resp.read1(65536):
                chunks.append(chunk)
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, chunks
        finally:
            conn.close()

    def logs(self) -> str:
        return logs(self.name)

    def state(self) -> dict:
        return inspect(self.name)["State"]

    def stop(self, grace_s: int = 30) -> float:
        """`docker stop` (SIGTERM, SIGKILL after grace_s, like SageMaker); returns the seconds it took."""
        t0 = time.monotonic()
        docker("stop", "-t", str(grace_s), self.name, timeout=grace_s + 30)
        return time.monotonic() - t0


@pytest.fixture(scope="session")
def start_serving(images, pytestconfig):
    """Factory: start the serving image on a model dir; every container it started is removed at the end."""
    started: list[str] = []

    def start(model_dir: Path, *docker_args: str, name: str) -> ServingContainer:
        name = f"{name}-{os.getpid()}"
        docker("rm", "-f", name, check=False)
        started.append(name)  # before `run`: a container that fails to start is still created
        docker(
            "run",
            "-d",
            "--name",
            name,
            "-p",
            "127.0.0.1::8080",
            "-v",
            f"{model_dir}:/opt/ml/model:ro",
            *docker_args,
            images.serve,
            "serve",
        )
        container = ServingContainer(name, host_port(name))
        record_timing(pytestconfig, f"{name}: start to first /ping 200", wait_for_ping(name, container.port))
        return container

    yield start
    for name in started:
        docker("rm", "-f", name, check=False)


@pytest.fixture(scope="session")
def serving(start_serving, artifact_dir) -> ServingContainer:
    """The serving image on the training image's artifact, as root (how SageMaker starts it)."""
    return start_serving(artifact_dir, name="llmft-test-serve")
