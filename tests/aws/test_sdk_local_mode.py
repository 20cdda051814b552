"""sagemaker-core's local mode with our images: `train --local` hands the CreateTrainingJob request to the
local client (docker compose runs the training image with `train`), fine-tuning the tiny model from file://
data; then `deploy --local` (CreateModel, CreateEndpointConfig, CreateEndpoint on the same client) serves the
model.tar.gz with the serving image and a runtime-client call answers. Fake credentials; AWS endpoints and
proxies point at a closed loopback port, telemetry is off.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.docker

TINY_HYPERPARAMETERS = ["max_steps=2", "eval_max_samples=2", "eval_train_samples=2", "eval_max_new_tokens=8"]
ROWS = [
    ("What is Amazon SageMaker?", "A managed service to build, train and deploy machine learning models."),
    ("What is a channel?", "A named input whose data SageMaker mounts under /opt/ml/input/data."),
    ("What port does serving use?", "The container listens on port 8080 for /ping and /invocations."),
    ("What is BYOC?", "Bringing your own container image that follows SageMaker's contract."),
]


@pytest.fixture(scope="module")
def local_training(run_cli, images, tiny_model_dir, tmp_path_factory) -> tuple[int, str, str, Path]:
    root = tmp_path_factory.mktemp("sdk-local")
    train = root / "train"
    train.mkdir()
    (train / "faq.csv").write_text("question,answer\n" + "".join(f'"{q}","{a}"\n' for q, a in ROWS))
    args = [
        "train",
        "--local",
        "--image",
        images.train,
        "--train",
        str(train),
        "--model-channel",
        str(tiny_model_dir),
        "--output",
        (root / "jobs").as_uri(),
        "--job-name",
        "llmft-sdk-local-test",
    ]
    for hp in TINY_HYPERPARAMETERS:
        args += ["-H", hp]
    result = run_cli(*args, timeout=900)
    return result.returncode, result.stdout, result.stderr, root / "jobs"


def test_train_local_runs_the_training_image_and_prints_the_model_tar_gz(local_training):
    code, out, err, _ = local_training
    assert code == 0, err[-4000:]
    uri = out.strip().splitlines()[-1]
    assert uri.startswith("file://") and uri.endswith("/model.tar.gz")
    with tarfile.open(urlparse(uri).path) as tar:
        names = tar.getnames()
    assert "manifest.json" in names and any(n.endswith(".safetensors") for n in names), names
    assert "tuned_eval_loss=" in err  # the job's log streamed (to stderr), metrics line included


def test_deploy_local_serves_the_artifact_and_a_predictor_call_answers(run_cli, images, local_training, servers):
    code, out, err, _ = local_training
    assert code == 0, err[-4000:]
    model_data = out.strip().splitlines()[-1]
    serving_before = _containers(images.serve)
    result = run_cli(
        "deploy",
        "--local",
        "--smoke-test",
        "--endpoint",
        "llmft-sdk-local-test",
        "--image",
        images.serve,
        "--model-data",
        model_data,
        "--port",
        str(servers.free_port()),
        "--ask",
        "What is a channel?",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "is InService" in result.stderr and "stopped" in result.stderr
    assert '"path": "/invocations", "status": 200' in result.stderr  # the serving container's own request log
    assert result.stdout.endswith("\n")  # the answer (a 2-step tiny model's words, so no check on its text)
    assert sorted(_containers(images.serve)) == sorted(serving_before)  # the SDK leaves it; deploy removes it


def test_train_local_reports_the_containers_failure_reason(run_cli, images, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    (train / "faq.csv").write_text("question,answer\nq,a\nq2,a2\n")
    result = run_cli(
        "train",
        "--local",
        "--image",
        images.train,
        "--train",
        str(train),
        "--output",
        (tmp_path / "jobs").as_uri(),
        "--job-name",
        "llmft-sdk-local-bad",
        "-H",
        "no_such_knob=1",
        timeout=600,
    )
    assert result.returncode == 1
    assert "unknown hyperparameter 'no_such_knob'" in result.stderr.splitlines()[-1]


def test_no_training_containers_are_left_behind(images, local_training):
    # Each local job's folder holds the compose file the SDK ran; its project is that folder's name.
    jobs = local_training[3]
    projects = {p.parent.name.lower() for p in jobs.glob("*/sagemaker-local/*/docker-compose.yaml")}
    assert projects, f"no compose file under {jobs}"
    for project in projects:
        assert not _containers(images.train, f"label=com.docker.compose.project={project}")


def _containers(image: str, *filters: str) -> list[str]:
    return subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            f"--filter=ancestor={image}",
            *(f"--filter={f}" for f in filters),
            "--format={{.Names}}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
