"""End to end: the training image's `train` writes /opt/ml/model; the serving image's `serve` answers from it."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TRAIN = Path(__file__).resolve().parents[2] / "containers" / "train" / "train"
PAIRS = [
    ("What does the serving image listen on?", "Port 8080, with GET /ping and POST /invocations."),
    ("How do I stream tokens?", "Send stream true and read server-sent events."),
    ("What happens when the queue is full?", "The server answers 429 at once."),
    ("Which weights are loaded?", "Only safetensors weights are loaded."),
    ("How are errors shaped?", "As JSON with error and error_type."),
    ("What does /ping return while loading?", "It returns 503 until a test generation works."),
]


@pytest.fixture(scope="module")
def trained_model_dir(tiny_model_dir, tmp_path_factory):
    """Run the training image's entry point on a tiny job, as its own tests do; return /opt/ml/model."""
    if not TRAIN.exists():
        pytest.skip("containers/train is not in this checkout")
    job = tmp_path_factory.mktemp("train-job")
    (job / "input" / "config").mkdir(parents=True)
    hyperparameters = {
        "model_id": str(tiny_model_dir),
        "max_steps": 2,
        "save_steps": 2,
        "logging_steps": 1,
        "per_device_batch_size": 4,
        "eval_max_new_tokens": 4,
        "eval_train_samples": 2,
        "max_seq_length": 512,
    }
    (job / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({k: json.dumps(v) for k, v in hyperparameters.items()})
    )
    out = io.StringIO()
    csv.writer(out).writerows([("question", "answer"), *PAIRS])
    (job / "input" / "data" / "train").mkdir(parents=True)
    (job / "input" / "data" / "train" / "faq.csv").write_text(out.getvalue())
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(TRAIN)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return job / "model"


def test_serve_answers_from_the_training_images_artifact(trained_model_dir, tmp_path, serve_process):
    assert (trained_model_dir / "model.safetensors").exists()
    server = serve_process(trained_model_dir, tmp_path)
    try:
        server.wait_ready()
        reply = server.generate("What does the serving image listen on?", max_new_tokens=8, details=True)
        assert reply["details"]["generated_tokens"] >= 1
        assert reply["details"]["finish_reason"] in ("length", "eos_token")
        status, _, raw = server.request(
            "POST",
            "/invocations",
            {"messages": [{"role": "user", "content": "How do I stream tokens?"}], "max_tokens": 4, "temperature": 0},
        )
        assert status == 200 and json.loads(raw)["object"] == "chat.completion"
        # The model name comes from the artifact's manifest.json.
        manifest = json.loads((trained_model_dir / "manifest.json").read_text())
        assert manifest["base_model"] in json.loads(raw)["model"]
    finally:
        server.stop()
