"""One training job from data to servable artifact, in the order it happens. Runs on every rank."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import data as data_lib
from . import prompts, report
from .config import TrainConfig
from .errors import DataError, TrainingInterrupted
from .modeling import BaseModel, load_model, load_tokenizer, resolve_base_model
from .sagemaker import Job

log = logging.getLogger(__name__)

BASE_EVAL_CACHE = "base_eval.json"  # in the checkpoint dir: a resumed job does not evaluate the base again


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_torchrun(cls, environ=os.environ) -> Rank:
        return cls(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))


@dataclass
class Datasets:
    train: list[data_lib.Example]
    validation: list[data_lib.Example]
    report: data_lib.DataReport


def load_datasets(config: TrainConfig, job: Job) -> Datasets:
    columns = data_lib.Columns(config.question_column, config.answer_column, config.context_column)
    train, data_report = data_lib.load_channel(job.train_dir, columns, config.csv_header)
    if job.validation_dir is not None:
        validation, _ = data_lib.load_channel(job.validation_dir, columns, config.csv_header, data_lib.DataReport())
    else:
        train, validation = data_lib.split(train, config.validation_fraction, config.seed)
    if not train:
        raise DataError("no training rows left after holding out the validation split; lower validation_fraction")
    return Datasets(train, validation, data_report)


def run(config: TrainConfig, job: Job, cache_dir: Path, stop_requested: threading.Event) -> None:
    import torch

    from . import evaluation, training
    from .artifact import merge_for_serving, save_artifact

    rank = Rank.from_torchrun()
    started = time.time()
    if rank.is_main:
        log.info("effective configuration:\n%s", json.dumps(config.to_dict(), indent=2))
    datasets = load_datasets(config, job)
    if rank.is_main:
        log.info("data: %s; %d training and %d validation examples",
                 datasets.report.summary(), len(datasets.train), len(datasets.validation))
        report.write_json(job.output_data_dir / report.DATA_REPORT_FILE, datasets.report.to_dict())

    base = resolve_base_model(config.model_id, job.model_channel_dir, cache_dir)
    tokenizer = load_tokenizer(base, config.trust_remote_code)
    setup = prompts.prepare_tokenizer(tokenizer, prompts.choose_format(config.prompt_format, tokenizer, base.name))
    log.info("prompt format: %s; pad token %r (id %s), stop tokens %s", setup.format, tokenizer.pad_token,
             tokenizer.pad_token_id, list(setup.stop_token_ids))
    train_set = _encode(tokenizer, datasets.train, config.max_seq_length, "training")
    collator = prompts.CompletionCollator(tokenizer.pad_token_id)
    eval_sets = _eval_sets(tokenizer, datasets, config)

    model = load_model(base, config.trust_remote_code)
    if setup.added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    device = torch.device(f"cuda:{rank.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def evaluate(m, label: str) -> dict:
        m.to(device)
        try:
            return evaluation.evaluate_model(
                m, tokenizer, label=label, sets=eval_sets, collator=collator, stop_token_ids=setup.stop_token_ids,
                max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size,
                should_stop=stop_requested.is_set,
            )
        except evaluation.EvaluationStopped as e:
            done = "the trained weights are in the last checkpoint" if label == "tuned" else "nothing was trained yet"
            raise TrainingInterrupted(
                f"stopped by SIGTERM while evaluating the {label} model ({e}); {done}. Run the job again with the "
                "same checkpoint location to resume."
            ) from e

    base_results: dict = {}
    if config.eval_base_model and rank.is_main and eval_sets:
        base_results = _cached_base_eval(job.checkpoint_dir, lambda: evaluate(model, "base"))

    if config.method == "lora":
        data_tokens = {t for e in train_set for t in e["input_ids"]} if config.train_token_embeddings else ()
        model = training.apply_lora(model, config, token_ids=data_tokens)
    outcome, trainer = training.train(model, tokenizer, train_set, config, job.checkpoint_dir, stop_requested, collator,
                                      world_size=rank.world_size)
    if outcome.interrupted:
        raise TrainingInterrupted(
            f"stopped by SIGTERM at step {outcome.global_step}; checkpoint saved in {job.checkpoint_dir}. "
            "Run the job again with the same checkpoint location to resume."
        )
    log.info("training done: %d steps, %.0f s, %.1f tokens/s (non-padding)", outcome.global_step,
             outcome.train_runtime_s, outcome.tokens_per_second)
    if torch.cuda.is_available():
        log.info("peak GPU memory: %.2f GiB allocated, %.2f GiB reserved",
                 torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)

    final_model = _final_model(trainer, outcome, config, base, job, rank)
    if not rank.is_main:
        return
    final_model = merge_for_serving(final_model)
    tuned_results = evaluate(final_model, "tuned") if eval_sets else {}
    table = report.comparison(base_results, tuned_results)
    report.log_comparison(table)
    for line in report.metric_lines(table):
        print(line, flush=True)

    manifest = _manifest(config, base, setup, datasets, outcome, table, started)
    save_artifact(final_model.to("cpu"), tokenizer, setup.stop_token_ids, job.model_dir, manifest)
    log.info("artifact written to %s", job.model_dir)

    out = job.output_data_dir
    report.write_json(out / report.REPORT_FILE, {"comparison": table, "training": manifest["training"],
                                                 "base_model": base.name, "method": config.method})
    report.write_samples(out / report.SAMPLES_FILE, eval_sets, base_results, tuned_results)
    report.plot_loss_curve(out / report.LOSS_CURVE_FILE, outcome.log_history,
                           table.get("validation", {}).get("loss", {}).get("base"),
                           table.get("validation", {}).get("loss", {}).get("tuned"))
    log.info("reports written to %s", out)


def _encode(tokenizer, examples, max_length: int, label: str) -> list[dict]:
    encoded, too_long = [], []
    for example in examples:
        item = prompts.encode_example(tokenizer, example)
        if len(item["input_ids"]) > max_length:
            too_long.append(example.source)
            continue
        encoded.append(item)
    if too_long:
        log.warning("%d %s example(s) longer than max_seq_length=%d tokens skipped: %s", len(too_long), label,
                    max_length, ", ".join(too_long[:10]) + (" ..." if len(too_long) > 10 else ""))
    if not encoded and label == "training":
        raise DataError(f"every training example is longer than max_seq_length={max_length} tokens")
    return encoded


def _eval_sets(tokenizer, datasets: Datasets, config: TrainConfig) -> dict:
    """Validation questions, and a seeded sample of training questions (what did the model learn?)."""
    from .evaluation import EvalSet

    rng = random.Random(config.seed)
    chosen = {
        "validation": datasets.validation[: config.eval_max_samples],
        "train_sample": rng.sample(datasets.train, min(config.eval_train_samples, len(datasets.train))),
    }
    sets = {}
    for name, examples in chosen.items():
        if not examples:
            continue
        sets[name] = EvalSet(
            questions=[e.question for e in examples],
            prompts=[prompts.prompt_text(tokenizer, e.question, e.context) for e in examples],
            references=[e.answer for e in examples],
            encoded=[prompts.encode_example(tokenizer, e) for e in examples],
        )
    return sets


def _cached_base_eval(checkpoint_dir: Path, evaluate) -> dict:
    cache = checkpoint_dir / BASE_EVAL_CACHE
    if cache.exists():
        log.info("base model evaluation reused from %s", cache)
        return json.loads(cache.read_text(encoding="utf-8"))
    results = evaluate()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(results), encoding="utf-8")
    os.replace(tmp, cache)
    return results


def _final_model(trainer, outcome, config: TrainConfig, base: BaseModel, job: Job, rank: Rank):
    """The trained model on the main rank. Under ZeRO-3 the weights are sharded: gather them through a save."""
    if config.deepspeed != "zero3":
        return outcome.model
    gathered = job.checkpoint_dir / "final-zero3"
    trainer.save_model(str(gathered))  # collective: every rank takes part
    if not rank.is_main:
        return None
    # Loading now must not go through ZeRO-3's sharded init (a collective the other ranks won't join).
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if config.method == "lora":
        from peft import PeftModel

        return PeftModel.from_pretrained(load_model(base, config.trust_remote_code), str(gathered))
    return load_model(BaseModel(str(gathered), base.name), config.trust_remote_code)


def _manifest(config, base, setup, datasets, outcome, table, started) -> dict:
    import peft
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__}
    if config.deepspeed != "none":
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    return {
        "format_version": 1,
        "base_model": base.name,
        "method": config.method,
        "prompt_format": setup.format,
        "stop_token_ids": list(setup.stop_token_ids),
        "hyperparameters": config.to_dict(),
        "data": {"train_examples": len(datasets.train), "validation_examples": len(datasets.validation),
                 "report": datasets.report.summary()},
        "training": {"steps": outcome.global_step, "runtime_s": round(outcome.train_runtime_s, 2),
                     "tokens_per_second": round(outcome.tokens_per_second, 2), "resumed_from": outcome.resumed_from,
                     "final_train_loss": next((e["loss"] for e in reversed(outcome.log_history) if "loss" in e), None),
                     "wall_time_s": round(time.time() - started, 1)},
        "metrics": report.json_safe(table),
        "versions": versions,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
