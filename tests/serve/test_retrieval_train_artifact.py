"""End to end: the training image, with retrieval on, writes /opt/ml/model with its index; the serving image
loads that index with its own reader and answers with the passages in the prompt and in `sources`."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve import create_app
from serve.config import ServeConfig
from serve.predictor import Predictor

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
    if not TRAIN.exists():
        pytest.skip("containers/train is not in this checkout")
    job = tmp_path_factory.mktemp("train-job-retrieval")
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
        "retrieval": "on",  # six rows: `auto` would leave it off
    }
    (job / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({k: json.dumps(v) for k, v in hyperparameters.items()})
    )
    out = io.StringIO()
    csv.writer(out).writerows([("question", "answer"), *PAIRS])
    (job / "input" / "data" / "train").mkdir(parents=True)
    (job / "input" / "data" / "train" / "faq.csv").write_text(out.getvalue())
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(TRAIN)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return job / "model"


def test_the_served_prompt_carries_the_training_images_passages(trained_model_dir):
    manifest = json.loads((trained_model_dir / "manifest.json").read_text())
    assert manifest["retrieval"]["dir"] == "retrieval"
    predictor = Predictor(ServeConfig(model_dir=trained_model_dir, torch_threads=1, max_new_tokens_cap=8))
    predictor.load_now()
    try:
        assert predictor.ready, predictor.reason
        assert len(predictor.retrieval) == manifest["retrieval"]["passages"]  # the training rows
        client = create_app(predictor.config, predictor=predictor).test_client()
        wanted = predictor.retrieval.passages[1]
        question = wanted.title.replace("?", ", please?")
        reply = client.post("/invocations", json={"inputs": question, "parameters": {"max_new_tokens": 2}})
        assert reply.status_code == 200, reply.json
        [item] = reply.json
        assert item["sources"][0] | {"score": 0} == {
            "id": 1,
            "title": wanted.title,
            "source": wanted.source,
            "score": 0,
        }
        assert wanted.source.startswith("faq.csv#") and (wanted.title, wanted.text) in PAIRS
        hits = predictor.retrieval.search(question)
        prompt = predictor.loaded.tokenizer.decode(
            predictor.prepare_chat([{"role": "user", "content": question}], field="inputs", retrieve=True).ids
        )
        assert f"{question}\n\nInput:\n[1] {hits[0].passage.title}\n{hits[0].passage.text}" in prompt
    finally:
        predictor.engine.stop()
