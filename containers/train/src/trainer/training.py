"""The training step itself: HF Trainer with LoRA (PEFT) or full fine-tuning, optionally under DeepSpeed.

What we add to the stock Trainer, and why:
- the loss runs the LM head on answer tokens only (`prompts.answer_token_loss`): the prompt's logits, a
  vocabulary-sized row per token, are never computed;
- length-grouped batches, so little compute goes to padding; or, with `packing`, several examples per row
  with no padding between them (TRL's best-fit packing; position ids restart per example, and Transformers then
  masks attention so that no example sees another);
- optional LoRA+ learning rates (B matrices faster than A; `loraplus_lr_ratio`);
- the warm-up-stable-decay schedule (`lr_scheduler=wsd`), its decay sized from the run's step count;
- a SIGTERM callback that checkpoints and stops every rank at the same step (SageMaker stop / spot);
- with `eval_steps`, the validation answer loss (the same loss, summed over the set and divided once by its answer
  tokens, as trainer.evaluation computes it), a checkpoint whenever it is a new best, and the best one loaded at
  the end (`load_best_model_at_end`), so the artifact is the best model;
- a checkpoint counts once every rank has saved it (a marker, written last), and resuming loads no pickled code,
  DeepSpeed's optimizer state included (`trainer.checkpoints`);
- metric lines CloudWatch's MetricDefinitions regexes can read.

This module imports torch and transformers at the top: import it inside functions, never from the launcher.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainerState, TrainingArguments

from . import checkpoints
from .config import TrainConfig
from .errors import CheckpointError
from .prompts import answer_token_loss
from .token_rows import use_row_sparse_forward

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DEEPSPEED_CONFIGS = {
    "zero2": CONFIGS_DIR / "ds_zero2.json",
    "zero3": CONFIGS_DIR / "ds_zero3.json",
    "zero3_offload": CONFIGS_DIR / "ds_zero3_offload.json",
}


@dataclass
class TrainOutcome:
    model: object  # the trained model (PeftModel for LoRA), still wrapped as trained
    interrupted: bool
    global_step: int
    resumed_from: str | None
    train_runtime_s: float
    tokens_seen: int
    log_history: list[dict]
    best_step: int | None = None  # with eval_steps: the step of the lowest validation answer loss
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None  # the checkpoint of that step, when one was saved
    loaded_best: bool = False  # the model holds the best checkpoint's weights, not the last step's

    @property
    def evaluations(self) -> list[dict]:
        """Every validation answer loss of the run, in order: [{"step": ..., "eval_loss": ...}]."""
        return [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in self.log_history if "eval_loss" in e]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_runtime_s if self.train_runtime_s > 0 else 0.0


def use_bf16(config: TrainConfig) -> bool:
    if config.precision == "fp32":
        return False
    if config.precision == "bf16":
        return True
    # Plain CPUs without native bf16 run bf16 autocast slower than fp32; GPUs since Ampere gain a lot.
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def use_packing(config: TrainConfig) -> bool:
    if config.packing == "auto":
        # On a GPU the padding a batch carries is wasted matrix work; on the CPU the demo's recipe was tuned
        # unpacked, one example per step, and packing would change what a step is.
        return torch.cuda.is_available()
    return config.packing == "true"


def training_rows(train_set: list[dict], config: TrainConfig):
    """The rows the Trainer iterates: one encoded example per row, or with packing several per row of at most
    `max_seq_length` tokens (best fit decreasing), each row saying its examples' lengths in `seq_lengths`.
    A `length` column serves the length-grouped sampler."""
    from datasets import Dataset

    rows = Dataset.from_list(train_set)
    if use_packing(config):
        from trl.data_utils import pack_dataset

        rows = pack_dataset(rows, config.max_seq_length, strategy="bfd")
        log.info(
            "packing: %d examples in %d rows of at most %d tokens", len(train_set), len(rows), config.max_seq_length
        )
    return rows.add_column("length", [len(ids) for ids in rows["input_ids"]])


def apply_lora(model, config: TrainConfig, token_ids: Collection[int] = ()):
    """LoRA adapters; unless `config.train_token_embeddings` is off, also trainable embedding rows for `token_ids`
    (the tokens the training data uses: in a small model the embeddings carry much of what full fine-tuning
    learns)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(config.seed)  # the A matrices' random start comes from the job's seed, the same on every rank

    tokens = sorted(token_ids) if config.train_token_embeddings else []
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_dora=config.lora_use_dora,
        target_modules=config.lora_targets,
        task_type="CAUSAL_LM",
        trainable_token_indices=tokens or None,  # PEFT's layer fails on an empty index list
    )
    model = get_peft_model(model, lora)
    if tokens:
        use_row_sparse_forward(model)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "%s r=%d alpha=%d on %s%s: %d trainable parameters of %d (%.2f%%)",
        "DoRA" if config.lora_use_dora else "LoRA",
        config.lora_r,
        config.lora_alpha,
        config.lora_target_modules,
        f" and the embeddings of {len(tokens)} tokens" if tokens else "",
        trainable,
        total,
        100 * trainable / total,
    )
    return model


def optimizer_steps(config: TrainConfig, train_rows: int, world_size: int = 1) -> int:
    """The optimizer steps a run takes, as the Trainer counts them: `max_steps` when set, else `epochs` passes
    over the batches each process gets (a last partial batch and a last partial accumulation count as whole)."""
    if config.max_steps > 0:
        return config.max_steps
    batches_per_process = math.ceil(train_rows / (config.per_device_batch_size * world_size))
    steps_per_epoch = max(math.ceil(batches_per_process / config.gradient_accumulation_steps), 1)
    return math.ceil(config.epochs * steps_per_epoch)


def lr_scheduler_kwargs(config: TrainConfig, train_rows: int, world_size: int = 1) -> dict | None:
    """What the learning-rate schedule needs beyond the step count: for `wsd`, the length of its decay, which
    HF's schedule takes in steps, not as a share of them."""
    if config.lr_scheduler != "wsd":
        return None
    decay_steps = round(config.lr_decay_ratio * optimizer_steps(config, train_rows, world_size))
    return {"num_decay_steps": decay_steps, "decay_type": "cosine"}


def evaluation_rows(eval_set: list[dict], config: TrainConfig):
    """The validation examples the Trainer evaluates every `eval_steps`: one per row, in the training collator's
    shape (with packing, rows of a single example)."""
    from datasets import Dataset

    rows = Dataset.from_list(eval_set)
    if use_packing(config):
        rows = rows.add_column("seq_lengths", [[len(ids)] for ids in rows["input_ids"]])
    return rows


def training_arguments(
    config: TrainConfig,
    checkpoint_dir: Path,
    *,
    train_rows: int,
    world_size: int = 1,
    run_name: str | None = None,
) -> TrainingArguments:
    """The HF Trainer settings a job's hyperparameters stand for, training on `train_rows` rows with
    `world_size` processes. Complete before the Trainer exists: nothing changes them during the run.

    Under ZeRO-3, creating them switches on DeepSpeed's `zero.Init` for the models loaded afterwards (each rank
    then loads only its shard): build them before loading the model, and keep them alive while it loads."""
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        # HF's plain "constant" would ignore the warm-up.
        lr_scheduler_type={"constant": "constant_with_warmup", "wsd": "warmup_stable_decay"}.get(
            config.lr_scheduler, config.lr_scheduler
        ),
        lr_scheduler_kwargs=lr_scheduler_kwargs(config, train_rows, world_size),
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=use_bf16(config),
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        # Evaluation during training: the validation answer loss (AnswerOnlyLossTrainer.evaluation_loop), the
        # lower the better; the last step is evaluated too. SaveWhenBest keeps every new best on disk.
        eval_strategy="steps" if config.eval_steps else "no",
        eval_steps=config.eval_steps or None,
        per_device_eval_batch_size=config.eval_batch_size,
        prediction_loss_only=True,
        metric_for_best_model="eval_loss" if config.eval_steps else None,
        greater_is_better=False if config.eval_steps else None,
        load_best_model_at_end=bool(config.eval_steps) and config.load_best_model_at_end,
        report_to="none",  # the trackers' callbacks come from trainer.tracking, pointed at the job's locations
        run_name=run_name,
        disable_tqdm=True,  # progress comes as one log line per logging step, readable in CloudWatch
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        deepspeed=str(DEEPSPEED_CONFIGS[config.deepspeed]) if config.deepspeed != "none" else None,
        # DeepSpeed and DDP pick NCCL on GPUs. Without one, accelerate only sets up multi-process training
        # (then DeepSpeed on top) when told it is on CPU, and the collectives go through gloo.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
        dataloader_num_workers=0,
    )


def start_sharded_loading(args: TrainingArguments) -> None:
    """Under ZeRO-3, before from_pretrained: the process group up, and DeepSpeed's own view of it, so that
    zero.Init partitions over every rank. The Trainer would do both later; loading sharded needs them first.
    (On GPUs accelerate's set-up also starts DeepSpeed's; on CPU only the torch process group is started.)"""
    import deepspeed

    _ = args.world_size  # sets up the devices and, with several processes, the torch process group
    deepspeed.init_distributed(dist_backend=args.ddp_backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def train(
    model,
    tokenizer,
    rows,
    config: TrainConfig,
    args: TrainingArguments,
    stop_requested: threading.Event,
    collator,
    eval_rows=None,
    callbacks: Collection = (),
) -> tuple[TrainOutcome, Trainer]:
    """Train on `rows` (from `training_rows`) with `args` (from `training_arguments`, for as many rows);
    `eval_rows` (from `evaluation_rows`) are evaluated every `eval_steps`; `callbacks` report to trackers."""
    checkpoint_dir = Path(args.output_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        # cuDNN's attention backend builds an execution plan for every new shape (pytorch/pytorch#155958), and
        # length-grouped batches bring a new sequence length nearly every step.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.lr_scheduler_kwargs:
        log.info(
            "learning rate: warm-up, stable, then decay over the last %d of %d steps",
            args.lr_scheduler_kwargs["num_decay_steps"],
            optimizer_steps(config, len(rows), args.world_size),
        )
    attention = None
    if use_packing(config):
        from .packed_attention import use_packed_attention

        attention = use_packed_attention(_unwrap(model))
    try:
        return _train(
            model, tokenizer, rows, config, args, stop_requested, collator, checkpoint_dir, eval_rows, callbacks
        )
    finally:
        if attention is not None:  # what is saved and served afterwards attends as before
            _unwrap(model).set_attn_implementation(attention)


def _train(model, tokenizer, dataset, config, args, stop_requested, collator, checkpoint_dir, eval_rows, callbacks):
    timing = ProgressLogger()
    stop = StopOnSignal(stop_requested)
    keep_best = [SaveWhenBest()] if args.load_best_model_at_end else []
    trainer = AnswerOnlyLossTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_rows if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=tokenizer,
        # Trackers first: they see each log before anything else acts on it.
        callbacks=[*callbacks, timing, stop, *keep_best, MarkCheckpointComplete()],
        job_config=config,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLogger prints one readable line per log instead
    deepspeed = config.deepspeed != "none"
    resume = checkpoints.last_complete_checkpoint(checkpoint_dir)
    if resume:
        log.info("resuming from %s (a previous run of this job left it)", resume)
        checkpoints.refuse_unsafe_pickles(Path(resume), deepspeed=deepspeed)
        best = _best_checkpoint(resume)
        if args.load_best_model_at_end and best and best != resume and Path(best).is_dir():
            checkpoints.refuse_unsafe_pickles(Path(best), deepspeed=deepspeed)  # loaded at the end
    try:
        with checkpoints.weights_only_loading(deepspeed=deepspeed):
            if resume and not deepspeed and _finished(resume, args.max_steps):
                # transformers runs one more step when it resumes at max_steps in the middle of an epoch (a job
                # stopped or killed after its last step): the training is done, so load that state instead.
                log.info("the checkpoint is at max_steps=%d: training is complete, loading it", args.max_steps)
                trainer._load_from_checkpoint(resume)
                trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
                best = trainer.state.best_model_checkpoint
                if args.load_best_model_at_end and best and Path(best).is_dir():
                    trainer._load_best_model()  # what the end of trainer.train() would have done
                result = None
            else:
                result = trainer.train(resume_from_checkpoint=resume)
    except pickle.UnpicklingError as e:  # what refuse_unsafe_pickles could not see statically, refused at load
        detail = str(e).split("WeightsUnpickler error: ", 1)[-1].split(". ", 1)[0]  # not torch's advice to unpickle
        raise CheckpointError(
            f"refusing to resume from {resume}: a file there would call code when loaded ({detail}). Remove that "
            "checkpoint directory to resume from an earlier one, and check who can write to the checkpoint location."
        ) from e
    state = trainer.state
    best_checkpoint = state.best_model_checkpoint if state.best_global_step else None
    loaded_best = bool(args.load_best_model_at_end and best_checkpoint and Path(best_checkpoint).is_dir())
    if state.best_global_step and state.is_world_process_zero:
        log.info(
            "best validation answer loss %.4f at step %d of %d; the artifact holds %s",
            state.best_metric,
            state.best_global_step,
            state.global_step,
            f"that step's weights ({Path(best_checkpoint).name})" if loaded_best else "the last step's weights",
        )
    return TrainOutcome(
        model=trainer.model if config.deepspeed == "none" else trainer.accelerator.unwrap_model(trainer.model_wrapped),
        interrupted=stop.stopped,
        global_step=state.global_step,
        resumed_from=resume,
        train_runtime_s=timing.train_seconds or (result.metrics.get("train_runtime", 0.0) if result else 0.0),
        tokens_seen=timing.tokens_this_run,
        log_history=list(state.log_history),
        best_step=state.best_global_step,
        best_eval_loss=state.best_metric if state.best_global_step else None,
        best_checkpoint=best_checkpoint,
        loaded_best=loaded_best,
    ), trainer


def _best_checkpoint(checkpoint: str) -> str | None:
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state.get("best_model_checkpoint")


def _finished(checkpoint: str, max_steps: int) -> bool:
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return max_steps > 0 and state.get("global_step", 0) >= max_steps


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


class AnswerOnlyLossTrainer(Trainer):
    """Cross-entropy on answer tokens, with the LM head applied to those positions only; LoRA+ learning rates
    for LoRA runs (PEFT's optimizer builder, so checkpoints resume with the same parameter groups)."""

    def __init__(self, *args, job_config: TrainConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.job_config = job_config  # what TrainingArguments has no field for (the LoRA+ ratio)

    def create_optimizer(self, model=None):
        ratio = self.job_config.loraplus_lr_ratio
        if self.optimizer is None and ratio > 1.0 and hasattr(self.model, "peft_config"):
            from peft.optimizers import create_loraplus_optimizer

            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = create_loraplus_optimizer(
                self.model,
                optimizer_cls,
                lr=self.args.learning_rate,
                loraplus_lr_ratio=ratio,
                loraplus_weight_decay=self.args.weight_decay,
                **optimizer_kwargs,
            )
            return self.optimizer
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, answer_tokens = self._answer_loss(model, inputs)
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            # The same scaling the stock compute_loss applies when tokens are averaged across devices.
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / answer_tokens.clamp(min=1)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation of one batch: its mean answer loss for the stock loop, and its summed loss and answer tokens
        added to the set's totals, from which evaluation_loop reports the loss of the whole set."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, answer_tokens = self._answer_loss(model, inputs)
        self._eval_totals += torch.stack([loss.detach().double(), answer_tokens.double()])
        return (loss / answer_tokens.clamp(min=1)).detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """`eval_loss` is the set's answer loss: every batch's loss summed, divided once by all their answer tokens
        (as trainer.evaluation.answer_loss), not the stock mean of batch means. With several processes a last
        uneven batch is padded with repeated examples, which then count twice (a few examples in a whole set)."""
        self._eval_totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        totals = self._eval_totals
        if self.args.world_size > 1:
            torch.distributed.all_reduce(totals)
        output.metrics[f"{metric_key_prefix}_loss"] = (totals[0] / totals[1].clamp(min=1)).item()
        return output

    def _answer_loss(self, model, inputs):
        """The batch's answer-token loss, summed, and its number of answer tokens (prompts.answer_token_loss)."""
        inner = _unwrap(model)
        captured = {}

        def keep_hidden(_module, _args, output):
            captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        handle = inner.get_decoder().register_forward_hook(keep_hidden)
        if "position_ids" in inputs:
            # Packed rows: no attention mask, so that Transformers reads the examples' bounds from the position
            # ids (they restart at 0 per example) and keeps each example's attention to itself. No cache either:
            # with one, it would not look.
            masking = {"position_ids": inputs["position_ids"], "use_cache": False}
            if "cu_seq_lens" in inputs:  # for trainer.packed_attention
                masking |= {"cu_seq_lens": inputs["cu_seq_lens"], "max_seq_len": int(inputs["max_seq_len"])}
        else:
            masking = {"attention_mask": inputs["attention_mask"]}
        try:
            # logits_to_keep=1: the model computes one position's logits instead of the whole sequence's.
            model(input_ids=inputs["input_ids"], logits_to_keep=1, **masking)
        finally:
            handle.remove()
        return answer_token_loss(captured["hidden"], inputs["labels"], inner.get_output_embeddings())


class ProgressLogger(TrainerCallback):
    """One metrics line per logging step: readable progress and CloudWatch metrics in one."""

    def __init__(self):
        self.started = 0.0
        self.train_seconds = 0.0
        self.tokens_at_start = 0
        self.tokens_this_run = 0
        self._last = (0.0, 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen or 0
        self._last = (self.started, self.tokens_at_start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "eval_loss" in logs:
            best = "" if state.best_metric is None else f" best_validation_answer_loss={state.best_metric:.4f}"
            print(
                f"metrics: step={state.global_step}/{state.max_steps} "
                f"validation_answer_loss={logs['eval_loss']:.4f}{best}",
                flush=True,
            )
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen or 0
        rate = (tokens - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, tokens)
        elapsed = now - self.started
        done = state.global_step / max(state.max_steps, 1)
        eta = elapsed / done * (1 - done) if done > 0 else 0.0
        print(
            f"metrics: step={state.global_step}/{state.max_steps} epoch={logs.get('epoch', state.epoch or 0):.2f} "
            f"train_loss={logs['loss']:.4f} learning_rate={logs.get('learning_rate', 0):.3e} "
            f"tokens_per_second={rate:.1f} elapsed={elapsed:.0f}s eta={eta:.0f}s",
            flush=True,
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self.started
        self.tokens_this_run = (state.num_input_tokens_seen or 0) - self.tokens_at_start


class SaveWhenBest(TrainerCallback):
    """With load_best_model_at_end: a checkpoint at every evaluation that beats the best so far, so that the best
    is always on disk to be loaded at the end (the Trainer only records a best step that it happens to save)."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and (state.best_metric is None or loss < state.best_metric):
            control.should_save = True
        return control


class MarkCheckpointComplete(TrainerCallback):
    """After each checkpoint save, once every rank has saved its part: the checkpoint's completion marker,
    written by one process per host (each host's view of the directory; see trainer.checkpoints)."""

    def on_save(self, args, state, control, **kwargs):
        if args.world_size > 1:
            torch.distributed.barrier()  # the Trainer's save has no barrier after the ranks' RNG state
        if args.local_process_index == 0:
            checkpoints.mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
        return control


class StopOnSignal(TrainerCallback):
    """On SIGTERM: checkpoint and stop, on every rank at the same step (a rank that ran on would hang)."""

    def __init__(self, requested: threading.Event):
        self.requested = requested
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested.is_set()
        if args.world_size > 1:
            flag = torch.tensor([int(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            log.warning("stop requested (SIGTERM): saving a checkpoint at step %d, then exiting", state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
        return control
