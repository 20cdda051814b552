#!/usr/bin/env python3
"""The main job on the embedded defaults: fine-tune SmolLM2-135M-Instruct on the sample dataset, locally.

    make train-demo                             # the sample dataset
    .venv/bin/python scripts/fetch_faq_dataset.py && \
    .venv/bin/python scripts/demo.py --data data/Amazon_SageMaker_FAQs.csv --hp epochs=3

It lays out a SageMaker job tree under runs/<timestamp>/ (exactly what SageMaker mounts at /opt/ml), runs
the training image's `train` entry point on it without Docker, and prints where the artifact and the
before/after report are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "data" / "sample" / "toolkit_faq.jsonl"
TRAIN = REPO / "containers" / "train" / "train"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=SAMPLE_DATA,
        help="a CSV/JSONL/Parquet file or a directory of them (default: the sample dataset)",
    )
    parser.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter, as SageMaker would pass it (repeatable); see README",
    )
    parser.add_argument("--job-dir", type=Path, default=None, help="job tree to use (default: runs/<timestamp>)")
    return parser.parse_args(argv)


def lay_out_job(job_dir: Path, data: Path, hyperparameters: dict[str, str]) -> None:
    train_channel = job_dir / "input" / "data" / "train"
    train_channel.mkdir(parents=True, exist_ok=True)
    if data.is_dir():
        shutil.copytree(data, train_channel, dirs_exist_ok=True)
    else:
        shutil.copy(data, train_channel / data.name)
    config = job_dir / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=2))


def summarize(job_dir: Path) -> None:
    from trainer.report import before_after_text  # the training image's own wording of its report

    print("\n" + before_after_text(json.loads((job_dir / "output" / "data" / "eval_report.json").read_text())))
    print(f"\nArtifact (what the serving image loads): {job_dir / 'model'}")
    print(f"Reports, sample answers, loss curve:     {job_dir / 'output' / 'data'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.data.exists():
        print(f"error: --data {args.data} does not exist", file=sys.stderr)
        return 2
    hyperparameters = {}
    for item in args.hp:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --hp expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        hyperparameters[key] = value
    job_dir = (args.job_dir or REPO / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    lay_out_job(job_dir, args.data, hyperparameters)
    print(f"Job tree: {job_dir}  (SAGEMAKER_BASE_DIR; SageMaker mounts the same layout at /opt/ml)", flush=True)
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job_dir), "PYTHONUNBUFFERED": "1"}
    code = subprocess.call([sys.executable, str(TRAIN)], env=env)
    if code != 0:
        failure = job_dir / "output" / "failure"
        reason = failure.read_text().splitlines()[0] if failure.exists() else "see the log above"
        print(f"\nTraining failed (exit {code}): {reason}", file=sys.stderr)
        return code
    summarize(job_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
