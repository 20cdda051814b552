"""Fixtures for the training image: a SageMaker job tree in a temporary directory, and ways to run it."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.faq_csv import faq_rows  # the generated FAQ's rows, raw; test modules import it from here too

REPO = Path(__file__).resolve().parents[2]
TRAIN_EXECUTABLE = REPO / "containers" / "train" / "train"


def csv_text(rows: list[list[str]], header: list[str] | None = None) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def make_job(
    root: Path,
    hyperparameters: dict,
    files: dict[str, str | bytes] | None = None,
    resource_config: dict | None = None,
    encode: str = "raw",
) -> Path:
    """A /opt/ml tree. `encode="sdk_v2"` JSON-encodes every value as SageMaker SDK v2 estimators do."""
    config = root / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    if encode == "sdk_v2":
        encoded = {k: json.dumps(v) for k, v in hyperparameters.items()}
    else:
        encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in hyperparameters.items()}
    (config / "hyperparameters.json").write_text(json.dumps(encoded))
    if resource_config is not None:
        (config / "resourceconfig.json").write_text(json.dumps(resource_config))
    for relative, content in (files or {}).items():
        path = root / "input" / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


def tiny_hyperparameters(model_dir: Path, **overrides) -> dict:
    """Fast settings for a tiny model: a few steps, short answers."""
    return {
        "model_id": str(model_dir),
        "max_steps": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "per_device_batch_size": 4,
        "eval_max_new_tokens": 8,
        "eval_train_samples": 4,
        "max_seq_length": 2048,
        **overrides,
    }


def run_train(job_dir: Path, timeout: float = 240, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN_EXECUTABLE)],
        env=job_env(job_dir, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def train_until_sigterm(job_dir: Path, at_step: int, env: dict | None = None, timeout: float = 180):
    """Start `train`, send SIGTERM once it logs step `at_step`; return (exit code, log, checkpoints by step)."""
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_EXECUTABLE)],
        env=job_env(job_dir, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = []
    for line in process.stdout:
        log.append(line)
        if line.startswith(f"metrics: step={at_step}/"):
            process.send_signal(signal.SIGTERM)
            break
    log.extend(process.stdout)
    code = process.wait(timeout=timeout)
    checkpoints = sorted(job_dir.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return code, "".join(log), checkpoints


def job_env(job_dir: Path, extra: dict | None = None) -> dict:
    env = {
        **os.environ,
        "SAGEMAKER_BASE_DIR": str(job_dir),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(extra or {}),
    }
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


class PickleTrap:
    """Unpickled, it creates `marker`: what someone who can write to the checkpoint location could plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> None:
    """Replace the file at `path` with a torch.save archive that creates `marker` when it is loaded unsafely."""
    import torch

    torch.save({"state": PickleTrap(marker), "weights": torch.zeros(2)}, path)


def set_hyperparameters(job_dir: Path, **changes) -> None:
    """Change some hyperparameters of an existing job tree (its rerun then asks for more steps, say)."""
    path = job_dir / "input" / "config" / "hyperparameters.json"
    values = json.loads(path.read_text())
    values.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()})
    path.write_text(json.dumps(values))


@pytest.fixture
def faq_csv_small() -> str:
    """12 rows of the generated FAQ (tests/fixtures/faq_csv.py) with a header row."""
    return csv_text(faq_rows(12), header=["question", "answer"])
