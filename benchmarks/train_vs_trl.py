#!/usr/bin/env python3
"""Training speed, memory and quality: our training image versus TRL's SFTTrainer, side by side, one run.

    .venv/bin/python scripts/fetch_faq_dataset.py       # once: downloads the FAQ CSV to data/Amazon_SageMaker_FAQs.csv
    make bench-train                    # full: that CSV, SmolLM2-135M-Instruct, LoRA r16, 3 epochs (~40 min on 2 cores)
    .venv/bin/python benchmarks/train_vs_trl.py --faq data/Amazon_SageMaker_FAQs.csv --max-steps 4   # a smoke run

`--faq PATH` names the CSV (default: data/Amazon_SageMaker_FAQs.csv, where scripts/fetch_faq_dataset.py puts it).

Both runs get the same model (the embedded SmolLM2-135M-Instruct), the same training rows (the FAQ minus a
seeded 15% of questions held out for evaluation), LoRA rank/alpha/dropout/targets, learning rate, batch size
and epochs. TRL keeps every other default (gradient checkpointing on, padding to the longest in a random batch,
full-sequence logits), in fp32 like ours on CPU. Tokens/s counts non-padding tokens per second of training.
Each run is a separate process, so its peak resident memory is its own. Results go to the `train` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import write_section

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FAQ = REPO / "data" / "Amazon_SageMaker_FAQs.csv"  # where scripts/fetch_faq_dataset.py writes it
TRAIN = REPO / "containers" / "train" / "train"


def run_measured(command: list[str], env: dict) -> tuple[int, float, float, str]:
    """Run a process; return exit code, wall seconds, its peak RSS in GiB, and its output."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    return process.returncode, time.perf_counter() - started, usage.ru_maxrss / 2**20, output


def add_faq_argument(parser: argparse.ArgumentParser, default: Path | None = DEFAULT_FAQ) -> None:
    """`--faq PATH`, the dataset the benchmark trains on; it is not in the repository."""
    where = f" (default: {shown(default)})" if default else ""
    parser.add_argument(
        "--faq",
        type=Path,
        default=default,
        metavar="PATH",
        help=f"the Amazon SageMaker FAQ CSV to train on{where}; scripts/fetch_faq_dataset.py downloads it",
    )


def check_faq(path: Path) -> None:
    if not path.is_file():
        sys.exit(
            f"no FAQ dataset at {path}: download it with `.venv/bin/python scripts/fetch_faq_dataset.py "
            f"--output {path}`, or pass --faq PATH"
        )


def shown(path: Path) -> str:
    """A path as the docs show it: relative to the repository when inside it, else only its name (no absolute
    path of this machine goes into docs/benchmarks.md)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return path.name


def write_job_tree(job: Path, hyperparameters: dict, faq: Path) -> None:
    """A SageMaker-shaped job directory: the FAQ as the train channel, hyperparameters as strings."""
    (job / "input" / "data" / "train").mkdir(parents=True)
    (job / "input" / "config").mkdir(parents=True)
    (job / "input" / "data" / "train" / faq.name).write_bytes(faq.read_bytes())
    (job / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({k: str(v) for k, v in hyperparameters.items()})
    )


def run_ours(workdir: Path, hyperparameters: dict, faq: Path) -> dict:
    job = workdir / "ours"
    write_job_tree(job, hyperparameters, faq)
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job), "PYTHONUNBUFFERED": "1"}
    print(f"ours: training in {job} ...", flush=True)
    code, wall, peak_gib, output = run_measured([sys.executable, str(TRAIN)], env)
    if code != 0:
        sys.exit(f"our training run failed (exit {code}):\n{output[-4000:]}")
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    embeddings = re.search(r"and the embeddings of (\d+) tokens", output)
    return {
        "tokens_per_second": manifest["training"]["tokens_per_second"],
        "embedding_tokens": int(embeddings.group(1)) if embeddings else 0,
        "train_runtime_s": manifest["training"]["runtime_s"],
        "steps": manifest["training"]["steps"],
        "final_train_loss": manifest["training"]["final_train_loss"],
        "peak_rss_gib": peak_gib,
        "wall_s": wall,
        "metrics": manifest["metrics"],
    }


TRL_SCRIPT = textwrap.dedent("""
    import json, sys
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    spec = json.loads(sys.argv[1])
    rows = [json.loads(line) for line in open(spec["data"])]
    dataset = Dataset.from_list([{"messages": [{"role": "user", "content": r["question"]},
                                               {"role": "assistant", "content": r["answer"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    config = SFTConfig(output_dir=spec["output_dir"], learning_rate=spec["learning_rate"],
                       per_device_train_batch_size=spec["batch_size"], num_train_epochs=spec["epochs"],
                       max_steps=spec["max_steps"], report_to="none", save_strategy="no", bf16=False,
                       use_cpu=True, seed=42)
    peft = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft)
    result = trainer.train()
    tokens_per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    epochs_done = result.metrics.get("epoch", spec["epochs"])
    print("RESULT " + json.dumps({
        "tokens_per_second": tokens_per_epoch * epochs_done / result.metrics["train_runtime"],
        "train_runtime_s": result.metrics["train_runtime"], "steps": trainer.state.global_step,
        "final_train_loss": result.metrics.get("train_loss"),
        "gradient_checkpointing": config.gradient_checkpointing}))
""")


def run_trl(workdir: Path, model_dir: Path, train_rows: list, hyperparameters: dict) -> dict:
    data = workdir / "trl_train.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "answer": e.answer}) + "\n" for e in train_rows))
    spec = {
        "data": str(data),
        "model": str(model_dir),
        "output_dir": str(workdir / "trl"),
        "learning_rate": hyperparameters["learning_rate"],
        "batch_size": hyperparameters["per_device_batch_size"],
        "epochs": hyperparameters["epochs"],
        "max_steps": hyperparameters.get("max_steps", -1),
        "lora_r": hyperparameters["lora_r"],
        "lora_alpha": hyperparameters["lora_alpha"],
        "lora_dropout": hyperparameters["lora_dropout"],
    }
    print("TRL SFTTrainer: training ...", flush=True)
    code, wall, peak_gib, output = run_measured(
        [sys.executable, "-c", TRL_SCRIPT, json.dumps(spec)], {**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    match = re.search(r"^RESULT (.*)$", output, re.MULTILINE)
    if code != 0 or not match:
        sys.exit(f"the TRL run failed (exit {code}):\n{output[-4000:]}")
    return {**json.loads(match.group(1)), "peak_rss_gib": peak_gib, "wall_s": wall}


def _verdicts(ratio: float, ours: dict, validation: dict, train_sample: dict) -> list[str]:
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    out = [
        f"tokens/s >= 1.3x TRL: {verdict(ratio >= 1.3)}",
        f"peak memory <= 4 GiB: {verdict(ours['peak_rss_gib'] <= 4)}",
    ]
    if train_sample:
        out.append(f"ROUGE-L on training questions >= 0.5: {verdict(train_sample['rouge_l']['tuned'] >= 0.5)}")
    if validation and validation["rouge_l"]["base"] is not None:
        better = validation["rouge_l"]["tuned"] > validation["rouge_l"]["base"]
        out.append(f"held-out ROUGE-L above the base model's: {verdict(better)}")
    return out


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"  # None: the run stopped before its first logged loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_faq_argument(parser)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop both runs early (smoke test of the script)")
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="epochs for both runs (default: the image's default, 3); a shorter run still compares "
        "tokens/s and memory, not the 3-epoch answer quality",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--note", default="", help="a line added to the docs section (e.g. machine load)")
    args = parser.parse_args(argv)
    check_faq(args.faq)

    from trainer.config import TrainConfig
    from trainer.data import load_channel, split
    from trainer.modeling import embedded_model_dir

    defaults = TrainConfig()
    hyperparameters = {
        "epochs": defaults.epochs,
        "learning_rate": defaults.learning_rate,
        "per_device_batch_size": defaults.per_device_batch_size,
        "lora_r": defaults.lora_r,
        "lora_alpha": defaults.lora_alpha,
        "lora_dropout": defaults.lora_dropout,
    }
    if args.epochs is not None:
        hyperparameters["epochs"] = args.epochs
    if args.max_steps > 0:  # a smoke run: few steps, few questions
        hyperparameters.update(max_steps=args.max_steps, eval_max_samples=4, eval_train_samples=4)
    model_dir = embedded_model_dir()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)
        (workdir / "faq").mkdir()
        (workdir / "faq" / args.faq.name).write_bytes(args.faq.read_bytes())
        examples, _ = load_channel(workdir / "faq")
        train_rows, held_out = split(examples, defaults.validation_fraction, defaults.seed)  # what ours does
        if args.max_steps <= 0:
            # Every training question, not the image's default sample of 32: a sample's mean moves by ±0.05 with
            # the questions drawn (docs/benchmarks.md, recipes), too much to tell a 0.5 target from 0.45.
            hyperparameters["eval_train_samples"] = len(train_rows)
        ours = run_ours(workdir, hyperparameters, args.faq)
        trl = run_trl(workdir, model_dir, train_rows, hyperparameters)

    ratio = ours["tokens_per_second"] / trl["tokens_per_second"]
    validation = ours["metrics"].get("validation", {})
    train_sample = ours["metrics"].get("train_sample", {})
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"`benchmarks/train_vs_trl.py --faq {shown(args.faq)}"
        f"{' --max-steps ' + str(args.max_steps) if args.max_steps > 0 else ''}"
        f"{' --epochs ' + format(args.epochs, 'g') if args.epochs is not None else ''}`. "
        f"SmolLM2-135M-Instruct (embedded), LoRA r{hyperparameters['lora_r']} alpha {hyperparameters['lora_alpha']}"
        f" all-linear, lr {hyperparameters['learning_rate']}"
        f"{f' (ours with LoRA+ ratio {defaults.loraplus_lr_ratio:g})' if defaults.loraplus_lr_ratio > 1 else ''}, "
        f"batch {hyperparameters['per_device_batch_size']}, "
        f"{hyperparameters['epochs']:g} epochs on {len(train_rows)} FAQ rows ({len(held_out)} held out), fp32.",
        "",
        "| | ours (containers/train) | TRL SFTTrainer (defaults) | ratio |",
        "|---|---|---|---|",
        f"| training tokens/s (non-padding) | {ours['tokens_per_second']:.1f} | {trl['tokens_per_second']:.1f} | "
        f"**{ratio:.2f}×** |",
        f"| training time | {ours['train_runtime_s']:.0f} s ({ours['steps']} steps) | "
        f"{trl['train_runtime_s']:.0f} s ({trl['steps']} steps) | |",
        f"| peak resident memory (whole process) | {ours['peak_rss_gib']:.2f} GiB | {trl['peak_rss_gib']:.2f} GiB | |",
        f"| final training loss | {_loss(ours['final_train_loss'])} (answer tokens) | "
        f"{_loss(trl['final_train_loss'])} | |",
        "",
        f"Answer quality of our run (greedy, up to {defaults.eval_max_new_tokens} new tokens), base model → tuned:",
        "",
        "| questions | ROUGE-L base | ROUGE-L tuned | exact match base → tuned | answer loss base → tuned |",
        "|---|---|---|---|---|",
    ]
    for name, rows in (("held-out (validation)", validation), ("training", train_sample)):
        if rows:
            lines.append(
                f"| {name}, {rows['count']} | {rows['rouge_l']['base']:.3f} | **{rows['rouge_l']['tuned']:.3f}** | "
                f"{rows['exact_match']['base']:.2f} → {rows['exact_match']['tuned']:.2f} | "
                f"{rows['loss']['base']:.3f} → {rows['loss']['tuned']:.3f} |"
            )
    checkpointing = "on" if trl["gradient_checkpointing"] else "off"
    lines += [
        "",
        f"TRL ran with gradient checkpointing {checkpointing} (its default)."
        " Ours: no gradient checkpointing (the model fits), length-grouped batches, and the LM head applied to"
        " answer tokens only"
        + (
            f"; it also trains the embeddings of the {ours['embedding_tokens']} tokens the data uses (the image's"
            " default, `lora_train_token_embeddings=auto`), which TRL's LoRA does not."
            if ours.get("embedding_tokens")
            else "."
        ),
    ]
    lines += ["", "Targets (3 epochs): " + "; ".join(_verdicts(ratio, ours, validation, train_sample)) + "."]
    if args.note:
        lines += ["", args.note]
    markdown = "\n".join(lines)
    print("\n" + markdown)
    print(f"\ntokens/s ratio ours / TRL = {ratio:.2f}")
    if not args.no_write:
        write_section("train", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
