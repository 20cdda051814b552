"""One training job from data to servable artifact, in the order it happens. Runs on every rank."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import data as data_lib
from . import prompts, report, tracking
from .config import TrainConfig
from .errors import ConfigError, DataError, TrainingInterrupted, UserError
from .modeling import (
    BaseModel,
    load_for_prompt_format,
    load_gguf,
    load_model,
    load_tokenizer,
    resolve_base_model,
    stored_dtype,
)
from .retrieval import (
    RETRIEVAL_DIR,
    Gate,
    Passage,
    RetrievalIndex,
    calibrate_gate,
    passages_from_documents,
    passages_from_rows,
    raft_documents,
)
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
    paraphrases: list[data_lib.Example] = field(default_factory=list)  # evaluated only, never trained on
    documents: list[Passage] = field(default_factory=list)  # the documents channel's passages, for retrieval
    has_documents_channel: bool = False


def load_datasets(config: TrainConfig, job: Job) -> Datasets:
    columns = data_lib.Columns(config.question_column, config.answer_column, config.context_column)
    train, data_report = data_lib.load_channel(job.train_dir, columns, config.csv_header)
    if job.validation_dir is not None:
        validation, _ = data_lib.load_channel(job.validation_dir, columns, config.csv_header, data_lib.DataReport())
    else:
        train, validation = data_lib.split(train, config.validation_fraction, config.seed)
    if not train:
        raise DataError("no training rows left after holding out the validation split; lower validation_fraction")
    paraphrases = []
    if job.paraphrases_dir is not None:
        paraphrases, _ = data_lib.load_channel(job.paraphrases_dir, columns, config.csv_header, data_lib.DataReport())
    documents = []
    if job.documents_dir is not None:
        if config.retrieval == "off":
            raise ConfigError(
                "hyperparameter 'retrieval': the documents channel is only used for retrieval, which is off; "
                "set retrieval=on (or auto), or leave the channel out"
            )
        documents = passages_from_documents(job.documents_dir)
    return Datasets(train, validation, data_report, paraphrases, documents, job.documents_dir is not None)


@dataclass
class Prepared:
    """What the job and a deferred evaluation build alike from the job tree: data, tokenizer, prompt format, sets."""

    datasets: Datasets
    base: BaseModel
    tokenizer: object
    setup: prompts.PromptSetup
    collator: prompts.CompletionCollator
    eval_sets: dict
    index: RetrievalIndex | None = None  # retrieval: built from the data when training, loaded from the artifact after


def prepare(
    config: TrainConfig, job: Job, cache_dir: Path, rank: Rank, artifact_manifest: dict | None = None
) -> Prepared:
    """Data, tokenizer, prompt format and evaluation sets. Retrieval is decided by the hyperparameters and the data
    when training; by the finished artifact (`artifact_manifest`, its index loaded from model/) when evaluating it."""
    datasets = load_datasets(config, job)
    if rank.is_main:
        log.info(
            "data: %s; %d training and %d validation examples%s",
            datasets.report.summary(),
            len(datasets.train),
            len(datasets.validation),
            f", {len(datasets.paraphrases)} paraphrased questions (evaluated only)" if datasets.paraphrases else "",
        )
    if artifact_manifest is None:
        index = _build_index(config, datasets, rank) if _use_retrieval(config, datasets) else None
    else:
        index = _load_index(job.model_dir, artifact_manifest)
    base = resolve_base_model(config.model_id, job.model_channel_dir, cache_dir, config.revision)
    if base.revision and rank.is_main:
        log.info("base model %s at revision %s (commit %s)", base.name, base.revision, base.commit or "unresolved")
    tokenizer = load_tokenizer(base, config.trust_remote_code)
    setup = prompts.prepare_tokenizer(
        tokenizer, prompts.choose_format(config.prompt_format, tokenizer, base.name), documents=index is not None
    )
    log.info(
        "prompt format: %s; pad token %r (id %s), stop tokens %s",
        setup.format,
        tokenizer.pad_token,
        tokenizer.pad_token_id,
        list(setup.stop_token_ids),
    )
    return Prepared(
        datasets,
        base,
        tokenizer,
        setup,
        prompts.CompletionCollator(tokenizer.pad_token_id),
        _eval_sets(tokenizer, datasets, config, retrieval=index is not None),
        index,
    )


def _use_retrieval(config: TrainConfig, datasets: Datasets) -> bool:
    """`retrieval`: on, off, or (auto) on from RETRIEVAL_MIN_ROWS training rows or with a documents channel."""
    return config.use_retrieval(len(datasets.train), documents=datasets.has_documents_channel)


def _build_index(config: TrainConfig, datasets: Datasets, rank: Rank) -> RetrievalIndex:
    """The index over the training rows (ids 0..rows-1, in row order: example i's own passage is passage i) and
    the documents channel's passages after them. Never the validation or paraphrased questions."""
    index = RetrievalIndex.build(
        passages_from_rows(datasets.train) + datasets.documents, k=config.retrieval_k, dense=config.retrieval_dense
    )
    index.gate = _retrieval_gate(config, datasets, index)
    if rank.is_main:
        files = len({p.source.rsplit("#", 1)[0] for p in datasets.documents})
        log.info(
            "retrieval: indexed %d passages (%d training rows, %d from %d document file(s)), BM25%s; k=%d, "
            "gold fraction %.2f",
            len(index),
            len(datasets.train),
            len(datasets.documents),
            files,
            " and title embeddings" if index.dense is not None else "",
            config.retrieval_k,
            config.retrieval_gold_fraction,
        )
        if index.gate.min_margin > 0:
            log.info(
                "retrieval: passages only where the best leads the next by %.4f or more (%s)",
                index.gate.min_margin,
                index.gate.calibration,
            )
        else:
            log.info("retrieval: no gate, every question gets passages (%s)", index.gate.calibration)
    return index


def _retrieval_gate(config: TrainConfig, datasets: Datasets, index: RetrievalIndex) -> Gate:
    """`retrieval_min_margin`: as given, or (auto) calibrated on the training rows; no `auto` gate with a documents
    channel, whose passages are not questions and answers the model trained on."""
    if config.retrieval_min_margin != "auto":
        return Gate(float(config.retrieval_min_margin), "retrieval_min_margin")
    if datasets.documents:
        return Gate(calibration="auto: a documents channel is indexed")
    return calibrate_gate(index, range(len(datasets.train)), seed=config.seed)


def _load_index(model_dir: Path, manifest: dict) -> RetrievalIndex | None:
    entry = manifest.get("retrieval")
    if not entry:
        return None
    index = RetrievalIndex.load(model_dir / entry.get("dir", RETRIEVAL_DIR))
    log.info("retrieval: the artifact's index, %d passages, k=%d", len(index), index.k)
    return index


def _training_documents(config: TrainConfig, parts: Prepared, rank: Rank) -> list[list[dict]] | None:
    """Each training example's documents (RAFT, trainer.retrieval.raft_documents), or None without retrieval."""
    if parts.index is None:
        return None
    train = parts.datasets.train
    chosen = raft_documents(
        parts.index,
        [e.question for e in train],
        range(len(train)),
        k=config.retrieval_k,
        gold_fraction=config.retrieval_gold_fraction,
        seed=config.seed,
        context_fraction=config.retrieval_train_fraction,
    )
    if rank.is_main:
        with_passages = sum(bool(c.passages) for c in chosen)
        log.info(
            "retrieval: %d of %d training examples with %d passages (%d of them with their own), %d closed book",
            with_passages,
            len(chosen),
            config.retrieval_k,
            sum(c.gold for c in chosen),
            len(chosen) - with_passages,
        )
    return [c.documents() for c in chosen]


def run(config: TrainConfig, job: Job, cache_dir: Path, stop_requested: threading.Event) -> None:
    import torch

    from . import training
    from .artifact import merge_for_serving, read_manifest, save_artifact, update_manifest

    rank = Rank.from_torchrun()
    started = time.time()
    if rank.is_main:
        log.info("effective configuration:\n%s", json.dumps(config.to_dict(), indent=2))
    trackers = tracking.check(config, job)
    parts = prepare(config, job, cache_dir, rank)
    if rank.is_main:
        report.write_json(job.output_data_dir / report.DATA_REPORT_FILE, parts.datasets.report.to_dict())
    train_set = _encode(
        parts.tokenizer,
        parts.datasets.train,
        config.max_seq_length,
        "training",
        _training_documents(config, parts, rank),
    )
    eval_rows = None
    if config.eval_steps:
        # With retrieval, validation questions carry the passages retrieved for them, as they will when served.
        validation_documents = (
            [parts.index.documents_for(e.question) for e in parts.datasets.validation] if parts.index else None
        )
        eval_set = _encode(
            parts.tokenizer, parts.datasets.validation, config.max_seq_length, "validation", validation_documents
        )
        if not eval_set:
            raise DataError(
                f"eval_steps={config.eval_steps} needs validation examples, and there are none: give a validation "
                "channel or a validation_fraction > 0 (with examples no longer than max_seq_length)"
            )
        eval_rows = training.evaluation_rows(eval_set, config)
    evaluate_in_job = config.evaluation == "in_job" and rank.is_main and bool(parts.eval_sets)

    resume = "Run the job again with the same checkpoint location to resume."
    evaluate = _evaluator(
        parts,
        config,
        stop_requested,
        when_stopped={
            "base": f"nothing was trained yet. {resume}",
            "tuned": f"the trained weights are in the last checkpoint. {resume}",
            "tuned_retrieval": f"the trained weights are in the last checkpoint. {resume}",
            "gguf": "the artifact is complete; run the image's `evaluate` command on this job tree for the report.",
        },
    )
    base_results: dict = {}
    if evaluate_in_job and config.eval_base_model:
        # A model of its own, loaded whole and freed after: under ZeRO-3 the training copy is sharded.
        base_results = _cached_base_eval(
            job.checkpoint_dir, lambda: evaluate(_load_for_prompt_format(parts, config), "base")
        )

    rows = training.training_rows(train_set, config)
    # Before the model: under ZeRO-3 these arguments make from_pretrained load each rank's shard only.
    args = training.training_arguments(
        config, job.checkpoint_dir, train_rows=len(rows), world_size=rank.world_size, run_name=job.job_name
    )
    if config.shards_parameters:
        training.start_sharded_loading(args)
    model = _load_for_prompt_format(parts, config)
    if config.shards_parameters:
        _log_shard(model, rank)
    if config.method == "lora":
        data_tokens = {t for e in train_set for t in e["input_ids"]} if config.train_token_embeddings else ()
        model = training.apply_lora(model, config, token_ids=data_tokens)
    collator = prompts.PackedCollator(parts.tokenizer.pad_token_id) if training.use_packing(config) else parts.collator
    outcome, trainer = training.train(
        model,
        parts.tokenizer,
        rows,
        config,
        args,
        stop_requested,
        collator,
        eval_rows=eval_rows,
        callbacks=tracking.callbacks(trackers),
    )
    if outcome.interrupted:
        raise TrainingInterrupted(
            f"stopped by SIGTERM at step {outcome.global_step}; checkpoint saved in {job.checkpoint_dir}. "
            "Run the job again with the same checkpoint location to resume."
        )
    log.info(
        "training done: %d steps, %.0f s, %.1f tokens/s (non-padding)",
        outcome.global_step,
        outcome.train_runtime_s,
        outcome.tokens_per_second,
    )
    if torch.cuda.is_available():
        log.info(
            "peak GPU memory: %.2f GiB allocated, %.2f GiB reserved",
            torch.cuda.max_memory_allocated() / 2**30,
            torch.cuda.max_memory_reserved() / 2**30,
        )

    final_model = _final_model(trainer, outcome, config, parts.base, job, rank)
    if not rank.is_main:
        return
    final_model = merge_for_serving(final_model)
    tuned_results = evaluate(final_model, "tuned") if evaluate_in_job else {}
    retrieval_results = _evaluate_with_retrieval(evaluate, final_model, parts) if evaluate_in_job else None
    table = report.comparison(base_results, tuned_results, tuned_retrieval=retrieval_results)
    run_id = tracking.mlflow_run_id(trackers)
    save_dtype = _artifact_dtype(config, parts.base)
    manifest = _manifest(config, parts, outcome, table, started, save_dtype, _tracking_manifest(trackers, run_id))
    final_model = final_model.to("cpu", dtype=getattr(torch, save_dtype))
    save_artifact(
        final_model,
        parts.tokenizer,
        parts.setup.stop_token_ids,
        job.model_dir,
        manifest,
        parts.setup.stop_strings,
        retrieval_index=parts.index,
        gguf_quantization=config.gguf_quantization,
    )
    log.info("artifact written to %s (%s)", job.model_dir, save_dtype)
    manifest = read_manifest(job.model_dir)  # as written: with the GGUF's entry
    gguf_results = None
    if evaluate_in_job:
        del final_model  # written; the GGUF's model takes its place in memory
        gguf_results = _evaluate_gguf(evaluate, job.model_dir, parts, config, manifest)
    if gguf_results:
        table = report.comparison(base_results, tuned_results, tuned_retrieval=retrieval_results, gguf=gguf_results)
        manifest = update_manifest(job.model_dir, {"metrics": report.json_safe(table)})
    if trackers.trackers:
        metrics = tracking.results_metrics(table, manifest["training"]["best"])
        _send_results(trackers, metrics, outcome.global_step, run_id)

    out = job.output_data_dir
    if config.evaluation == "in_job":
        report.write_eval_reports(
            out, table, manifest, parts.eval_sets, base_results, tuned_results, retrieval_results, gguf_results
        )
    else:
        log.info("evaluation deferred: run the image's `evaluate` command on this job tree for the A/B report")
    report.plot_loss_curve(
        out / report.LOSS_CURVE_FILE,
        outcome.log_history,
        table.get("validation", {}).get("loss", {}).get("base"),
        table.get("validation", {}).get("loss", {}).get("tuned"),
    )
    log.info("reports written to %s", out)


def evaluate_artifact(config: TrainConfig, job: Job, cache_dir: Path, stop_requested: threading.Event) -> None:
    """The A/B report of a finished job: the base model and the artifact in model/, on the job's own sets.

    What `evaluation=deferred` leaves for later (the image's `evaluate` command): the sets, prompt format and
    settings are rebuilt from the same job tree and hyperparameters, so the report equals an in-job one.
    """
    from .artifact import MANIFEST

    manifest_path = job.model_dir / MANIFEST
    if not manifest_path.exists():
        raise UserError(f"{job.model_dir} holds no finished artifact (no {MANIFEST}): run the training job first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    parts = prepare(config, job, cache_dir, Rank(), artifact_manifest=manifest)
    if not parts.eval_sets:
        raise UserError("nothing to evaluate: eval_max_samples and eval_train_samples are both 0 or the sets are empty")
    again = "the artifact is complete; run `evaluate` again for the report."
    evaluate = _evaluator(
        parts, config, stop_requested, when_stopped=dict.fromkeys(("base", "tuned", "tuned_retrieval", "gguf"), again)
    )
    base_results = evaluate(_load_for_prompt_format(parts, config), "base") if config.eval_base_model else {}
    tuned = load_model(BaseModel(str(job.model_dir), "the tuned artifact"), config.trust_remote_code)
    tuned_results = evaluate(tuned, "tuned")
    retrieval_results = _evaluate_with_retrieval(evaluate, tuned, parts)
    del tuned
    gguf_results = _evaluate_gguf(evaluate, job.model_dir, parts, config, manifest)
    table = report.comparison(base_results, tuned_results, tuned_retrieval=retrieval_results, gguf=gguf_results)
    trackers = tracking.check(config, job)
    if trackers.trackers:  # to the training's own run, which the manifest names
        run_id = (manifest.get("tracking") or {}).get("mlflow_run_id")
        _send_results(trackers, tracking.results_metrics(table), manifest["training"]["steps"], run_id)
    report.write_eval_reports(
        job.output_data_dir,
        table,
        manifest,
        parts.eval_sets,
        base_results,
        tuned_results,
        retrieval_results,
        gguf_results,
    )
    log.info("reports written to %s", job.output_data_dir)


def _evaluate_with_retrieval(evaluate, model, parts: Prepared) -> dict | None:
    """The tuned model again, each question's prompt carrying the passages the index retrieves for it (the
    third column of the report); None without an index."""
    if parts.index is None:
        return None
    return evaluate(model, "tuned_retrieval", documents_for=parts.index.documents_for)


def _evaluate_gguf(evaluate, model_dir: Path, parts: Prepared, config: TrainConfig, manifest: dict):
    """The artifact's GGUF asked as the server asks it (with the retrieved passages when the artifact has an index):
    the report's column for what quantization cost. None when there is no GGUF, `eval_gguf` is off, or Transformers
    cannot read the file back (the log says which)."""
    entry = manifest.get("gguf")
    if not config.eval_gguf or not entry:
        return None
    log.info("evaluating %s (%s), loaded back dequantized", entry["file"], entry["quantization"])
    model = load_gguf(model_dir, entry["file"])
    if model is None:
        return None
    model.config.pad_token_id = parts.tokenizer.pad_token_id
    documents_for = parts.index.documents_for if parts.index is not None else None
    return evaluate(model, "gguf", documents_for=documents_for)


def _send_results(trackers: tracking.Tracking, metrics: dict, step: int, run_id: str | None) -> None:
    """The evaluation's results to the trackers. The artifact and reports are written by now: a tracking server
    that fails at this point costs its copy of the results, not the job."""
    try:
        tracking.log_results(trackers, metrics, step, run_id)
    except Exception as e:  # whatever a tracker's client raises (network, auth, store)
        log.warning("could not send the evaluation results to %s: %s", " and ".join(trackers.trackers), e)


def _best(outcome) -> dict | None:
    """The best evaluation of the run (eval_steps), for the manifest: step, loss, and whether the artifact is it."""
    if outcome.best_step is None:
        return None
    return {
        "step": outcome.best_step,
        "eval_loss": outcome.best_eval_loss,
        "checkpoint": Path(outcome.best_checkpoint).name if outcome.best_checkpoint else None,
        "artifact_is_best": outcome.loaded_best or outcome.best_step == outcome.global_step,
    }


def _tracking_manifest(trackers: tracking.Tracking, run_id: str | None) -> dict | None:
    """Where the run's metrics went. Not the tracking URI: it can carry credentials, and the manifest ships."""
    if not trackers.trackers:
        return None
    return {
        "report_to": list(trackers.trackers),
        "tensorboard_dir": str(trackers.tensorboard_dir) if trackers.tensorboard else None,
        "mlflow_experiment_name": trackers.mlflow_experiment_name if trackers.mlflow else None,
        "mlflow_run_id": run_id,
    }


def _artifact_dtype(config: TrainConfig, base: BaseModel) -> str:
    """What the artifact is saved in: `save_dtype`, or the base model's own floating type (training ran in fp32
    or mixed precision either way)."""
    return config.save_dtype if config.save_dtype != "auto" else stored_dtype(base, config.trust_remote_code)


def _load_for_prompt_format(parts: Prepared, config: TrainConfig):
    return load_for_prompt_format(
        parts.base,
        parts.tokenizer,
        added_tokens=bool(parts.setup.added_tokens),
        seed=config.seed,
        trust_remote_code=config.trust_remote_code,
    )


def _log_shard(model, rank: Rank) -> None:
    """How much of the model this rank holds after loading under ZeRO-3 (`ds_tensor` is its partition of a
    parameter, `ds_numel` the whole parameter's size): about 1/world_size when loading was sharded."""
    held = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log.info(
        "ZeRO-3: rank %d holds %d of the model's %d parameters (%.1f%%) after loading",
        rank.rank,
        held,
        total,
        100 * held / max(total, 1),
    )


def _evaluator(parts: Prepared, config: TrainConfig, stop_requested: threading.Event, when_stopped: dict[str, str]):
    """evaluate(model, label) on the prepared sets; a SIGTERM mid-way becomes TrainingInterrupted."""
    import torch

    from . import evaluation

    rank = Rank.from_torchrun()
    device = torch.device(f"cuda:{rank.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def evaluate(model, label: str, documents_for=None) -> dict:
        model.to(device)
        try:
            return evaluation.evaluate_model(
                model,
                parts.tokenizer,
                label=label,
                sets=parts.eval_sets,
                collator=parts.collator,
                stop_token_ids=parts.setup.stop_token_ids,
                stop_strings=parts.setup.stop_strings,
                max_new_tokens=config.eval_max_new_tokens,
                batch_size=config.eval_batch_size,
                should_stop=stop_requested.is_set,
                **({"documents_for": documents_for} if documents_for is not None else {}),
            )
        except evaluation.EvaluationStopped as e:
            raise TrainingInterrupted(
                f"stopped by SIGTERM while evaluating the {label} model ({e}); {when_stopped[label]}"
            ) from e

    return evaluate


def _encode(tokenizer, examples, max_length: int, label: str, documents: list | None = None) -> list[dict]:
    """The examples encoded (with `documents[i]` in example i's prompt, when given), too long ones skipped."""
    encoded, too_long = [], []
    for i, example in enumerate(examples):
        item = prompts.encode_example(tokenizer, example, documents[i] if documents is not None else None)
        if len(item["input_ids"]) > max_length:
            too_long.append(example.source)
            continue
        encoded.append(item)
    if too_long:
        log.warning(
            "%d %s example(s) longer than max_seq_length=%d tokens skipped: %s",
            len(too_long),
            label,
            max_length,
            ", ".join(too_long[:10]) + (" ..." if len(too_long) > 10 else ""),
        )
    if not encoded and label == "training":
        raise DataError(f"every training example is longer than max_seq_length={max_length} tokens")
    return encoded


def _eval_sets(tokenizer, datasets: Datasets, config: TrainConfig, retrieval: bool = False) -> dict:
    """Validation questions, a seeded sample of training questions (what did the model learn?), and the
    paraphrased questions when given (rewordings of training questions: did it learn more than the wording?).
    With retrieval, training and paraphrased questions have their answer's passage (gold) in the index."""
    from .evaluation import eval_set

    rng = random.Random(config.seed)
    chosen = {
        "validation": (datasets.validation[: config.eval_max_samples], False),
        "train_sample": (rng.sample(datasets.train, min(config.eval_train_samples, len(datasets.train))), retrieval),
        "paraphrased": (datasets.paraphrases[: config.eval_max_samples], retrieval),
    }
    return {
        name: eval_set(tokenizer, examples, gold_in_index=gold) for name, (examples, gold) in chosen.items() if examples
    }


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
    if not config.shards_parameters:
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


def _manifest(config, parts: Prepared, outcome, table, started, dtype: str, tracked: dict | None = None) -> dict:
    import peft
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if config.deepspeed != "none":
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    return {
        "format_version": 1,
        "base_model": parts.base.name,
        "base_model_revision": parts.base.revision,  # a hub model's revision as asked for (None: not from the hub)
        "base_model_commit": parts.base.commit,  # the commit it resolved to and was loaded at, when known
        "method": config.method,
        "prompt_format": parts.setup.format,
        "dtype": dtype,
        "stop_token_ids": list(parts.setup.stop_token_ids),
        "stop_strings": list(parts.setup.stop_strings),
        "hyperparameters": config.to_dict(),
        "data": {
            "train_examples": len(parts.datasets.train),
            "validation_examples": len(parts.datasets.validation),
            "report": parts.datasets.report.summary(),
        },
        "training": {
            "steps": outcome.global_step,
            "runtime_s": round(outcome.train_runtime_s, 2),
            "tokens_per_second": round(outcome.tokens_per_second, 2),
            "resumed_from": outcome.resumed_from,
            "final_train_loss": next((e["loss"] for e in reversed(outcome.log_history) if "loss" in e), None),
            "wall_time_s": round(time.time() - started, 1),
            "evaluations": outcome.evaluations,  # eval_steps: the validation answer loss during training
            "best": _best(outcome),
        },
        "retrieval": _retrieval_manifest(parts),
        "tracking": tracked,
        "metrics": report.json_safe(table),
        "evaluation": config.evaluation,
        "versions": versions,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _retrieval_manifest(parts: Prepared) -> dict | None:
    """manifest.json's `retrieval`: where the index is in the artifact, its k and size; None without retrieval."""
    if parts.index is None:
        return None
    return {
        "dir": RETRIEVAL_DIR,
        "k": parts.index.k,
        "passages": len(parts.index),
        "documents": len(parts.datasets.documents),
        "min_margin": parts.index.gate.min_margin,
    }
