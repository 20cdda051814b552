#!/usr/bin/env python3
"""Which training recipe teaches the embedded model the FAQ best in 3 epochs: one training job per recipe.

    .venv/bin/python benchmarks/train_recipes.py                       # every recipe, 2 jobs at a time (~35 min a pair)
    .venv/bin/python benchmarks/train_recipes.py --only defaults dora  # some of them (names: --help)
    .venv/bin/python benchmarks/train_recipes.py --collect             # only tabulate jobs already in --jobs-dir

Each recipe is a real job of the training image (containers/train/train) on the FAQ, in its own SageMaker-shaped
tree under --jobs-dir, with the same seeded held-out split, evaluating the tuned model on the 23 held-out
questions and 32 training questions (greedy answers, ROUGE-L and answer loss). A job whose tree already holds a
finished model is not run again, so an interrupted sweep picks up where it stopped. The table, read from each
job's manifest.json, goes to the `train-recipes` section of docs/benchmarks.md. Tokens/s are per job: jobs that
ran side by side shared the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_vs_trl import FAQ, REPO, TRAIN, write_job_tree, write_section  # it also puts trainer/ on the path

# Overrides of the image's defaults; every recipe is LoRA rank 16 for 3 epochs unless it says otherwise.
RECIPES: dict[str, dict] = {
    "defaults": {},
    "lr 3e-3": {"learning_rate": 0.003, "lora_alpha": 32},
    "lr 3e-3, batch 2": {"learning_rate": 0.003, "per_device_batch_size": 2},
    "lr 1e-3": {"learning_rate": 0.001},
    "lr 5e-4": {"learning_rate": 0.0005},
    "constant lr": {"lr_scheduler": "constant"},
    "warm-up, stable, decay": {"lr_scheduler": "wsd"},
    "LoRA+ 16, lr 1e-3": {"learning_rate": 0.001, "loraplus_lr_ratio": 16},
    "DoRA": {"lora_use_dora": True},
    "LoRA + token embeddings": {"lora_train_token_embeddings": True},
    "LoRA + token embeddings, alpha 128": {"lora_train_token_embeddings": True, "lora_alpha": 128},
    "LoRA + token embeddings, seed 43": {"lora_train_token_embeddings": True, "seed": 43},
    "no gradient clipping": {"max_grad_norm": 0},
    "full fine-tuning, lr 1e-4": {"method": "full", "learning_rate": 0.0001},
    "full fine-tuning, lr 3e-4": {"method": "full", "learning_rate": 0.0003},
    "full fine-tuning, lr 5e-4": {"method": "full", "learning_rate": 0.0005},
    "full fine-tuning, lr 7e-4": {"method": "full", "learning_rate": 0.0007},
    "full fine-tuning, lr 5e-4, seed 43": {"method": "full", "learning_rate": 0.0005, "seed": 43},
}
EVALUATION = {"eval_base_model": False, "eval_max_samples": 23, "eval_train_samples": 32}
DOCS_SECTION = "train-recipes"


def job_name(recipe: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", recipe.lower().replace("+", "plus")).strip("-")


def run_jobs(recipes: list[str], jobs_dir: Path, parallel: int, smoke: dict) -> None:
    """Start up to `parallel` jobs at once, each pinned to its share of the cores."""
    cores = sorted(os.sched_getaffinity(0))
    parallel = min(parallel, len(cores))
    share = len(cores) // parallel
    pending = [r for r in recipes if not (jobs_dir / job_name(r) / "model" / "manifest.json").exists()]
    running: dict[str, tuple[subprocess.Popen, float, list[int]]] = {}
    free = [cores[i:i + share] for i in range(0, share * parallel, share)]
    while pending or running:
        while pending and free:
            recipe, slot = pending.pop(0), free.pop(0)
            job = jobs_dir / job_name(recipe)
            if job.exists():
                shutil.rmtree(job)  # an unfinished earlier try
            write_job_tree(job, {**EVALUATION, **RECIPES[recipe], **smoke})
            env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job), "PYTHONUNBUFFERED": "1",
                   "OMP_NUM_THREADS": str(len(slot)), "OMP_WAIT_POLICY": "PASSIVE"}
            with open(job / "log.txt", "w") as log:  # the child keeps its own copy of the descriptor
                process = subprocess.Popen([sys.executable, str(TRAIN)], env=env, stdout=log,
                                           stderr=subprocess.STDOUT,
                                           preexec_fn=lambda cpus=slot: os.sched_setaffinity(0, cpus))
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
    """The hyperparameters a finished job ran with that differ from the image's defaults (evaluation aside)."""
    from trainer.config import TrainConfig

    defaults = TrainConfig()
    changed = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(hyperparameters.items())
               if k not in EVALUATION and k != "max_steps" and hasattr(defaults, k) and getattr(defaults, k) != v]
    return ", ".join(changed) or "the defaults"


def table(jobs_dir: Path) -> str:
    rows = []
    for manifest_path in sorted(jobs_dir.glob("*/model/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        metrics, training = manifest["metrics"], manifest["training"]
        train_sample, validation = metrics.get("train_sample"), metrics.get("validation")
        if not train_sample or not validation:
            continue
        rows.append((train_sample["rouge_l"]["tuned"], differences(manifest["hyperparameters"]), train_sample,
                     validation, training))
    rows.sort(key=lambda row: -row[0])
    counts = f"{rows[0][2]['count']} training questions and {rows[0][3]['count']} held-out ones" if rows else ""
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, `benchmarks/train_recipes.py`: one job "
        "of the training image per recipe, SmolLM2-135M-Instruct (embedded), the FAQ with a seeded 15% of questions "
        f"held out, LoRA rank 16, 3 epochs unless the recipe says otherwise; the tuned model answers {counts} "
        "greedily (up to 256 new tokens). Sorted by ROUGE-L on training questions.",
        "",
        "| recipe (what differs from the defaults) | ROUGE-L, training questions | answer loss, training | "
        "ROUGE-L, held-out | answer loss, held-out | steps |",
        "|---|---|---|---|---|---|",
    ]
    for _, recipe, train_sample, validation, training in rows:
        lines.append(
            f"| {recipe} | **{train_sample['rouge_l']['tuned']:.3f}** | {train_sample['loss']['tuned']:.3f} | "
            f"{validation['rouge_l']['tuned']:.3f} | {validation['loss']['tuned']:.3f} | {training['steps']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs-dir", type=Path, default=REPO / "runs" / "recipes")
    names = {job_name(recipe): recipe for recipe in RECIPES}
    parser.add_argument("--only", nargs="+", choices=list(names), metavar="RECIPE",
                        help=f"recipes to run, of: {', '.join(names)}")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at a time (they split the cores)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop each job after this many steps, and evaluate on 4 questions (a smoke run)")
    parser.add_argument("--collect", action="store_true", help="run nothing; tabulate the jobs in --jobs-dir")
    parser.add_argument("--note", default="", help="a line added under the table (e.g. how the jobs were run)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    if not FAQ.exists():
        sys.exit(f"the FAQ dataset is expected at {FAQ}")
    if not args.collect:
        smoke = {"max_steps": args.max_steps, "eval_max_samples": 4, "eval_train_samples": 4} if args.max_steps else {}
        run_jobs([names[n] for n in args.only] if args.only else list(RECIPES), args.jobs_dir, max(1, args.parallel),
                 smoke)
    markdown = table(args.jobs_dir) + (f"\n\n{args.note}" if args.note else "")
    print("\n" + markdown)
    if not args.no_write:
        write_section(markdown, DOCS_SECTION)
        print("written to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
