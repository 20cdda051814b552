#!/usr/bin/env python3
"""Which training recipe teaches the embedded model the FAQ best in 3 epochs: one training job per recipe.

    .venv/bin/python scripts/fetch_faq_dataset.py       # once: downloads the FAQ CSV to data/Amazon_SageMaker_FAQs.csv
    .venv/bin/python benchmarks/train_recipes.py --faq data/Amazon_SageMaker_FAQs.csv   # every recipe, 2 jobs at a time
    .venv/bin/python benchmarks/train_recipes.py --faq data/Amazon_SageMaker_FAQs.csv --only defaults dora  # some
    .venv/bin/python benchmarks/train_recipes.py --collect             # only tabulate jobs already in --jobs-dir

`--faq PATH` defaults to data/Amazon_SageMaker_FAQs.csv; `--only` takes the names `--help` lists. A pair of jobs
takes ~35 min on 2 cores.

Each recipe is a real job of the training image (containers/train/train) on the FAQ, in its own SageMaker-shaped
tree under --jobs-dir, with the same seeded held-out split, evaluating the tuned model on the 23 held-out
questions and 32 training questions (greedy answers, ROUGE-L and answer loss). A job whose tree already holds a
finished model is not run again, so an interrupted sweep picks up where it stopped. The table, read from each
job's manifest.json (a recipe run with several seeds is one row, their mean), goes to the `train-recipes`
section of docs/benchmarks.md. Tokens/s are per job: jobs that ran side by side shared the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_section
from train_vs_trl import (
    REPO,
    TRAIN,
    add_faq_argument,
    check_faq,
    shown,
    write_job_tree,
)

# Overrides of the image's defaults; every recipe is LoRA rank 16 for 3 epochs unless it says otherwise. Recipes keep
# the settings they were measured with when a default changed since: `lr_scheduler: cosine` (the default until
# linear decay beat it, see benchmarks/gpu_recipes.py) and, before that, `lora_train_token_embeddings: False`.
COSINE = {"lr_scheduler": "cosine"}
NO_EMBEDDINGS = {**COSINE, "lora_train_token_embeddings": False}
RECIPES: dict[str, dict] = {
    "defaults": {},
    **{f"defaults, seed {seed}": {"seed": seed} for seed in range(43, 48)},
    "cosine decay": COSINE,
    **{f"cosine decay, seed {seed}": {**COSINE, "seed": seed} for seed in range(43, 48)},
    "alpha 128": {**COSINE, "lora_alpha": 128},
    "LoRA+ 4": {**COSINE, "loraplus_lr_ratio": 4},
    "LoRA+ 4, seed 43": {**COSINE, "loraplus_lr_ratio": 4, "seed": 43},
    "no token embeddings": NO_EMBEDDINGS,
    "no token embeddings, seed 43": {**NO_EMBEDDINGS, "seed": 43},
    "no token embeddings, seed 44": {**NO_EMBEDDINGS, "seed": 44},
    "lr 3e-3": {**NO_EMBEDDINGS, "learning_rate": 0.003, "lora_alpha": 32},
    "lr 3e-3, batch 2": {**NO_EMBEDDINGS, "learning_rate": 0.003, "per_device_batch_size": 2},
    "lr 1e-3": {**NO_EMBEDDINGS, "learning_rate": 0.001},
    "lr 5e-4": {**NO_EMBEDDINGS, "learning_rate": 0.0005},
    "constant lr": {**NO_EMBEDDINGS, "lr_scheduler": "constant"},
    "warm-up, stable, decay": {**NO_EMBEDDINGS, "lr_scheduler": "wsd"},
    "LoRA+ 16, lr 1e-3": {**NO_EMBEDDINGS, "learning_rate": 0.001, "loraplus_lr_ratio": 16},
    "DoRA": {**NO_EMBEDDINGS, "lora_use_dora": True},
    "no gradient clipping": {**NO_EMBEDDINGS, "max_grad_norm": 0},
    "full fine-tuning, lr 1e-4": {**COSINE, "method": "full", "learning_rate": 0.0001},
    "full fine-tuning, lr 3e-4": {**COSINE, "method": "full", "learning_rate": 0.0003},
    "full fine-tuning, lr 5e-4": {**COSINE, "method": "full", "learning_rate": 0.0005},
    "full fine-tuning, lr 7e-4": {**COSINE, "method": "full", "learning_rate": 0.0007},
    "full fine-tuning, lr 5e-4, seed 43": {**COSINE, "method": "full", "learning_rate": 0.0005, "seed": 43},
}
EVALUATION = {"eval_base_model": False, "eval_max_samples": 23, "eval_train_samples": 32}
DOCS_SECTION = "train-recipes"


def job_name(recipe: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", recipe.lower().replace("+", "plus")).strip("-")


def run_jobs(recipes: list[str], jobs_dir: Path, parallel: int, smoke: dict, faq: Path) -> None:
    """Start up to `parallel` jobs at once, each pinned to its share of the cores."""
    cores = sorted(os.sched_getaffinity(0))
    parallel = min(parallel, len(cores))
    share = len(cores) // parallel
    pending = [r for r in recipes if not (jobs_dir / job_name(r) / "model" / "manifest.json").exists()]
    running: dict[str, tuple[subprocess.Popen, float, list[int]]] = {}
    free = [cores[i : i + share] for i in range(0, share * parallel, share)]
    while pending or running:
        while pending and free:
            recipe, slot = pending.pop(0), free.pop(0)
            job = jobs_dir / job_name(recipe)
            if job.exists():
                shutil.rmtree(job)  # an unfinished earlier try
            write_job_tree(job, {**EVALUATION, **RECIPES[recipe], **smoke}, faq)
            env = {
                **os.environ,
                "SAGEMAKER_BASE_DIR": str(job),
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": str(len(slot)),
                "OMP_WAIT_POLICY": "PASSIVE",
            }
            with open(job / "log.txt", "w") as log:  # the child keeps its own copy of the descriptor
                process = subprocess.Popen(
                    [sys.executable, str(TRAIN)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=lambda cpus=slot: os.sched_setaffinity(0, cpus),
                )
            running[recipe] = (process, time.monotonic(), slot)
            print(f"{recipe}: started on cores {slot}, log {job / 'log.txt'}", flush=True)
        time.sleep(5)
        for recipe, (process, started, slot) in list(running.items()):
            if process.poll() is None:
                continue
            del running[recipe]
            free.append(slot)
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"{recipe}: {status} after {time.monotonic() - started:.0f} s", flush=True)


def differences(hyperparameters: dict) -> str:
    """The hyperparameters a finished job ran with that differ from the image's defaults (evaluation and seed aside:
    runs of one recipe with different seeds share a row)."""
    from trainer.config import TrainConfig

    defaults = TrainConfig()
    ignored = {*EVALUATION, "max_steps", "seed", "lora_train_token_embeddings"}
    changed = [
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in sorted(hyperparameters.items())
        if k not in ignored and hasattr(defaults, k) and getattr(defaults, k) != v
    ]
    # Compared by effect, for LoRA only: jobs from before `auto` became the default recorded true or false, and
    # jobs from before the option existed trained no embeddings.
    keys = ("method", "deepspeed", "lora_train_token_embeddings")
    recorded = {"lora_train_token_embeddings": "false", **{k: v for k, v in hyperparameters.items() if k in keys}}
    job = TrainConfig.from_hyperparameters(recorded)
    if job.method == "lora" and job.train_token_embeddings != defaults.train_token_embeddings:
        changed.append(f"lora_train_token_embeddings={str(job.train_token_embeddings).lower()}")
    return ", ".join(sorted(changed)) or "the defaults"


def sampling_error(job: Path) -> float:
    """Standard error of the mean ROUGE-L over the training questions a job answered: how far that mean could move
    had other questions been drawn. Per-question scores come from the job's own sample answers."""
    from trainer.evaluation import rouge_l

    answers = job / "output" / "data" / "sample_answers.jsonl"
    if not answers.exists():  # a job tree kept without its outputs
        return float("nan")
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    scores = [rouge_l(row["tuned_answer"], row["reference"]) for row in rows if row["set"] == "train_sample"]
    return statistics.stdev(scores) / len(scores) ** 0.5 if len(scores) > 1 else float("nan")


def _mean(runs: list[dict], questions: str, metric: str) -> float:
    return statistics.fmean(run[questions][metric]["tuned"] for run in runs)


def _run_score(run: dict) -> str:
    error = "" if math.isnan(run["error"]) else f" ± {run['error']:.2f}"
    return f"{run['train']['rouge_l']['tuned']:.3f}{error} ({run['seed']})"


def table(jobs_dir: Path, command: str = "benchmarks/train_recipes.py") -> str:
    runs: dict[str, list[dict]] = {}
    for manifest_path in sorted(jobs_dir.glob("*/model/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        metrics = manifest["metrics"]
        if not metrics.get("train_sample") or not metrics.get("validation"):
            continue
        runs.setdefault(differences(manifest["hyperparameters"]), []).append(
            {
                "seed": manifest["hyperparameters"]["seed"],
                "train": metrics["train_sample"],
                "validation": metrics["validation"],
                "steps": manifest["training"]["steps"],
                "error": sampling_error(manifest_path.parent.parent),
            }
        )
    rows = sorted(runs.items(), key=lambda item: -_mean(item[1], "train", "rouge_l"))
    first = rows[0][1][0] if rows else None
    counts = (
        f"{first['train']['count']} training questions and {first['validation']['count']} held-out ones"
        if first
        else ""
    )
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, `{command}`: one job "
        "of the training image per recipe and seed, SmolLM2-135M-Instruct (embedded), the FAQ with a seeded 15% of "
        "questions held out, LoRA rank 16, 3 epochs unless the recipe says otherwise; the tuned model answers "
        f"{counts} greedily (up to 256 new tokens). Where a recipe ran with several seeds, its row gives the mean "
        "over them, and each run's score with its seed; ± is that score's standard error from answering a sample of "
        "training questions rather than all of them. Sorted by ROUGE-L on training questions.",
        "",
        "| recipe (what differs from the defaults) | ROUGE-L, training questions | runs: ROUGE-L ± s.e. (seed) | "
        "answer loss, training | ROUGE-L, held-out | answer loss, held-out | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, rr in rows:
        per_run = ", ".join(map(_run_score, sorted(rr, key=lambda run: run["seed"])))
        lines.append(
            f"| {recipe} | **{_mean(rr, 'train', 'rouge_l'):.3f}** | {per_run} | {_mean(rr, 'train', 'loss'):.3f} | "
            f"{_mean(rr, 'validation', 'rouge_l'):.3f} | {_mean(rr, 'validation', 'loss'):.3f} | {rr[0]['steps']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_faq_argument(parser)
    parser.add_argument("--jobs-dir", type=Path, default=REPO / "runs" / "recipes")
    names = {job_name(recipe): recipe for recipe in RECIPES}
    parser.add_argument(
        "--only", nargs="+", choices=list(names), metavar="RECIPE", help=f"recipes to run, of: {', '.join(names)}"
    )
    parser.add_argument("--parallel", type=int, default=2, help="jobs at a time (they split the cores)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="stop each job after this many steps, and evaluate on 4 questions (a smoke run)",
    )
    parser.add_argument("--collect", action="store_true", help="run nothing; tabulate the jobs in --jobs-dir")
    parser.add_argument("--note", default="", help="a line added under the table (e.g. how the jobs were run)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    if not args.collect:
        check_faq(args.faq)
        smoke = {"max_steps": args.max_steps, "eval_max_samples": 4, "eval_train_samples": 4} if args.max_steps else {}
        run_jobs(
            [names[n] for n in args.only] if args.only else list(RECIPES),
            args.jobs_dir,
            max(1, args.parallel),
            smoke,
            args.faq,
        )
    command = f"benchmarks/train_recipes.py --faq {shown(args.faq)}"
    markdown = table(args.jobs_dir, command) + (f"\n\n{args.note}" if args.note else "")
    print("\n" + markdown)
    if not args.no_write:
        write_section(DOCS_SECTION, markdown)
        print("written to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
