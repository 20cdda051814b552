"""The training job's typed configuration, built once from SageMaker hyperparameters.

SageMaker hands every hyperparameter over as a string, and clients disagree on the encoding: SDK v2
estimators JSON-encode each value (`"\"lora\""`, `"3"`), SDK v3 and raw API callers send plain strings
(`"lora"`). `TrainConfig.from_hyperparameters` accepts both, rejects unknown keys, and names the key of any
value it cannot use. No torch here: this module is imported by the launcher before anything heavy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .retrieval import GATE_MIN_ROWS

EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct"
RETRIEVAL_MIN_ROWS = 40  # `retrieval=auto` turns retrieval on from this many training rows
RETRIEVAL_MAX_K = 10
DEFAULT_REVISION = "main"  # the hub's default branch, as from_pretrained takes it

# Keys that SageMaker SDKs add for their own toolkits; they mean nothing to this image and are ignored.
_SDK_RESERVED_PREFIXES = ("sagemaker_", "_tuning_objective_metric")


def _hp(default: Any, help: str, choices: tuple[str, ...] | None = None, minimum: float | None = None):
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if minimum is not None:
        metadata["minimum"] = minimum
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter the training image accepts. README's table is checked against this class."""

    # > The base model
    model_id: str = _hp(
        EMBEDDED_MODEL_ID,
        "Base model: a Hugging Face hub id (e.g. databricks/dolly-v2-3b), a local directory, or the embedded "
        "default. A `model` channel, when given, takes precedence.",
    )
    revision: str = _hp(
        DEFAULT_REVISION,
        "For a hub `model_id`: the branch, tag or commit to load. A commit hash pins exactly what is trained; the "
        "commit it resolved to is recorded in manifest.json either way.",
    )
    trust_remote_code: bool = _hp(False, "Allow the base model's own Python code to run. Off unless you trust it.")
    method: str = _hp("lora", "Fine-tuning method.", choices=("lora", "full"))

    # > Data
    question_column: str = _hp("question", "Column holding the question / instruction (alias: instruction).")
    answer_column: str = _hp("answer", "Column holding the answer / response (alias: response).")
    context_column: str = _hp("context", "Optional column with context for the question; used when present.")
    csv_header: str = _hp(
        "auto",
        "Whether CSV files have a header row; `auto` looks for the column names in the first row.",
        choices=("auto", "true", "false"),
    )
    validation_fraction: float = _hp(
        0.15, "Share of questions held out for validation when no `validation` channel is given.", minimum=0.0
    )
    prompt_format: str = _hp(
        "auto",
        "`chat_template` uses the base model's chat template, `dolly` the Dolly instruction format; `auto` picks "
        "the chat template when the tokenizer has one and the model is not a Dolly model.",
        choices=("auto", "chat_template", "dolly"),
    )
    max_seq_length: int = _hp(
        1024, "Longest training sequence in tokens; longer examples are reported and skipped.", minimum=16
    )

    # > Retrieval (RAFT: training with retrieved passages in the prompt, arXiv:2403.10131)
    retrieval: str = _hp(
        "auto",
        "Build a retrieval index (BM25, and `retrieval_dense` embeddings) over the training rows (one passage per "
        "row: question and answer) and the `documents` "
        "channel, ship it in the artifact (model/retrieval/, used by the serving image), and train a "
        "`retrieval_train_fraction` of the examples with `retrieval_k` retrieved passages in their prompt. `auto` "
        "turns it on from "
        f"{RETRIEVAL_MIN_ROWS} training rows, or with a `documents` channel.",
        choices=("auto", "on", "off"),
    )
    retrieval_k: int = _hp(
        3, f"Passages retrieved into each prompt, in training and when serving (1 to {RETRIEVAL_MAX_K}).", minimum=1
    )
    retrieval_dense: bool = _hp(
        True,
        "Rank passages by static word embeddings of their titles as well as by BM25 (WordLlama's model, shipped in its "
        "package), so that a reworded question finds its row without sharing a word with it.",
    )
    retrieval_gold_fraction: float = _hp(
        0.8,
        "Of the examples trained with passages, the share whose passages include the example's own row (the others "
        "get only other rows' passages, so the model also answers from what it learned when retrieval misses), "
        "from 0 to 1.",
        minimum=0.0,
    )
    retrieval_train_fraction: float = _hp(
        0.25,
        "Share of training examples trained with passages in their prompt, from 0 to 1; the others train on the "
        "question alone (closed book), which teaches the answers themselves and keeps the job's time near a run "
        "without retrieval (an example with k passages is several times longer).",
        minimum=0.0,
    )
    retrieval_min_margin: str = _hp(
        "auto",
        "The gate: a question gets passages only when the best one's score leads the next by this much (the fused "
        "score is at most 3); below it the model answers from memory, as for a question whose answer is not "
        "indexed. A number >= 0 (0: always passages), or `auto`: set from the training rows (each one's question "
        "searched with its own row left out, a high quantile of those leads), without a gate under "
        f"{GATE_MIN_ROWS} rows or with a `documents` channel.",
    )

    # > Optimisation
    epochs: float = _hp(3.0, "Passes over the training data.", minimum=0.0)
    max_steps: int = _hp(-1, "Stop after this many optimizer steps (overrides epochs when > 0).")
    learning_rate: float = _hp(2e-3, "Peak learning rate (after warm-up).", minimum=0.0)
    lr_scheduler: str = _hp(
        "linear",
        "Learning-rate schedule after the warm-up: `linear` or `cosine` decay to 0, `constant`, or `wsd` (warm-up, "
        "stable, decay: constant, then a cosine decay to 0 over the last `lr_decay_ratio` of the steps).",
        choices=("linear", "cosine", "constant", "wsd"),
    )
    lr_decay_ratio: float = _hp(
        0.2, "With `lr_scheduler=wsd`: share of steps, at the end, over which it decays.", minimum=0.0
    )
    warmup_ratio: float = _hp(0.05, "Share of steps spent warming the learning rate up.", minimum=0.0)
    weight_decay: float = _hp(0.0, "AdamW weight decay.", minimum=0.0)
    max_grad_norm: float = _hp(
        1.0, "Clip the gradient's global norm to this before each step; 0 turns clipping off.", minimum=0.0
    )
    per_device_batch_size: int = _hp(1, "Sequences per device per step.", minimum=1)
    gradient_accumulation_steps: int = _hp(1, "Micro-batches accumulated per optimizer step.", minimum=1)
    packing: str = _hp(
        "auto",
        "Pack several examples into each row of up to `max_seq_length` tokens, with no padding and no attention "
        "across examples; `per_device_batch_size` then counts rows. `auto` packs on GPUs.",
        choices=("auto", "true", "false"),
    )
    gradient_checkpointing: bool = _hp(False, "Recompute activations in the backward pass: less memory, ~30% slower.")
    seed: int = _hp(42, "Seed for data split, shuffling and initialisation.")

    # > LoRA
    lora_r: int = _hp(16, "LoRA rank.", minimum=1)
    lora_alpha: int = _hp(64, "LoRA scaling numerator (scale = alpha / r).", minimum=1)
    lora_dropout: float = _hp(0.0, "Dropout on the LoRA input.", minimum=0.0)
    lora_target_modules: str = _hp(
        "all-linear", "Comma-separated module names to adapt, or `all-linear` for every linear layer but the head."
    )
    lora_use_dora: bool = _hp(
        False,
        "DoRA (arXiv:2402.09353): learn each weight column's magnitude apart from its LoRA direction. "
        "Merges into plain weights like LoRA.",
    )
    lora_train_token_embeddings: str = _hp(
        "auto",
        "Also train the embedding rows of the tokens that occur in the training data (PEFT trainable tokens; "
        "the LM head follows when the model ties it to the embeddings). Merged into plain weights like LoRA. `auto` "
        "turns it on for LoRA without DeepSpeed, the only setup that supports it.",
        choices=("auto", "true", "false"),
    )
    loraplus_lr_ratio: float = _hp(
        1.0,
        "LoRA+ (arXiv:2402.12354): the B matrices learn this many times faster than the A matrices, e.g. 16. "
        "1 = plain LoRA.",
        minimum=1.0,
    )

    save_dtype: str = _hp(
        "auto",
        "Floating type of the artifact's weights: `auto` keeps the base model's (a bf16 or fp16 base gives a bf16 or "
        "fp16 artifact, half the size of fp32; the embedded model is fp32), recorded in manifest.json.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )

    gguf_quantization: str = _hp(
        "q8_0",
        "Also write the artifact as GGUF for llama.cpp (the serving image's CPU engine) with llama.cpp's own "
        "converter, recorded in manifest.json: `q8_0` (8-bit, near-lossless), `q4_k_m` or `q4_0` (4-bit, need "
        "llama-cpp-python's quantizer; `q4_0` decodes many sequences fastest on x86 CPUs, but costs a small model "
        "much: the report's GGUF column shows it) or `none`. A base the converter does not support keeps the "
        "safetensors artifact alone, with the reason in the log.",
        choices=("none", "q8_0", "q4_k_m", "q4_0"),
    )

    # > Hardware and distribution
    deepspeed: str = _hp(
        "none",
        "DeepSpeed ZeRO stage, from the checked-in configs in configs/: `zero2` shards optimizer state and "
        "gradients, `zero3` the parameters too (each rank loads only its shard), `zero3_offload` also keeps the "
        "parameters and optimizer state in CPU memory (full fine-tuning of a 3B model on one 24 GB GPU).",
        choices=("none", "zero2", "zero3", "zero3_offload"),
    )
    nproc_per_node: int = _hp(0, "Processes per host; 0 means one per GPU, or 1 on CPU.", minimum=0)
    precision: str = _hp(
        "auto",
        "`auto` trains in bf16 mixed precision on GPUs that support it and fp32 on CPU.",
        choices=("auto", "bf16", "fp32"),
    )

    # > Checkpoints and logging
    save_steps: int = _hp(50, "Checkpoint every this many steps (and on SIGTERM).", minimum=1)
    save_total_limit: int = _hp(2, "Checkpoints kept in the checkpoint directory.", minimum=1)
    logging_steps: int = _hp(5, "Log metrics every this many steps.", minimum=1)
    report_to: str = _hp(
        "none",
        "Where training metrics also go: `tensorboard` (event files in /opt/ml/output/tensorboard, which "
        "SageMaker's TensorBoardOutputConfig uploads), `mlflow` (the tracking server in the environment variable "
        "MLFLOW_TRACKING_URI, a SageMaker managed MLflow ARN included; experiment MLFLOW_EXPERIMENT_NAME, run "
        "named after the training job), both as `tensorboard,mlflow`, or `none`. The A/B evaluation's results "
        "follow at the end.",
    )

    # > Evaluation during training
    eval_steps: int = _hp(
        0,
        "Every this many steps (and at the last step), compute the answer loss on the validation examples; 0 = "
        "never. `save_steps` must then be a multiple of it.",
        minimum=0,
    )
    load_best_model_at_end: bool = _hp(
        True,
        "With `eval_steps`: the artifact is the checkpoint with the lowest validation answer loss, not the last "
        "step's weights (its step and loss are in manifest.json).",
    )

    # > Evaluation (A/B: base model versus tuned model)
    evaluation: str = _hp(
        "in_job",
        "`in_job` evaluates the base and the tuned model before the job ends; `deferred` writes the artifact "
        "without evaluating, and the image's `evaluate` command, run later on the same job tree, writes the same "
        "report (`make demo` does this to open the chat page sooner).",
        choices=("in_job", "deferred"),
    )
    eval_base_model: bool = _hp(True, "Also evaluate the untouched base model, for the before/after comparison.")
    eval_gguf: bool = _hp(
        True,
        "Also evaluate the artifact's GGUF (its quantized weights loaded back through Transformers, asked as served), "
        "for a report column that shows what `gguf_quantization` cost. Skipped, with why in the log, where there is "
        "no GGUF or Transformers cannot read it.",
    )
    eval_max_samples: int = _hp(64, "Validation questions answered by each model (0 = none).", minimum=0)
    eval_train_samples: int = _hp(32, "Training questions answered by each model, to see what it learned.", minimum=0)
    eval_max_new_tokens: int = _hp(256, "Longest generated answer during evaluation.", minimum=1)
    eval_batch_size: int = _hp(8, "Questions answered at once during evaluation.", minimum=1)

    def __post_init__(self) -> None:
        # true/false as a boolean hyperparameter would be written (SDK v2 sends json.dumps(True))
        object.__setattr__(
            self, "retrieval", {"true": "on", "false": "off"}.get(str(self.retrieval).lower(), self.retrieval)
        )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"hyperparameter '{f.name}': {value!r} is not one of {', '.join(choices)}")
            minimum = f.metadata.get("minimum")
            if minimum is not None and value < minimum:
                raise ConfigError(f"hyperparameter '{f.name}': {value!r} must be at least {minimum:g}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError("hyperparameter 'validation_fraction': must be in [0, 1)")
        if self.retrieval_k > RETRIEVAL_MAX_K:
            raise ConfigError(f"hyperparameter 'retrieval_k': {self.retrieval_k} must be at most {RETRIEVAL_MAX_K}")
        if self.retrieval_gold_fraction > 1.0:
            raise ConfigError("hyperparameter 'retrieval_gold_fraction': must be in [0, 1]")
        if self.retrieval_train_fraction > 1.0:
            raise ConfigError("hyperparameter 'retrieval_train_fraction': must be in [0, 1]")
        if self.retrieval_min_margin != "auto":
            try:
                margin = float(self.retrieval_min_margin)
            except ValueError:
                margin = float("nan")
            if not margin >= 0:
                raise ConfigError(
                    f"hyperparameter 'retrieval_min_margin': {self.retrieval_min_margin!r} must be auto or a "
                    "number >= 0"
                )
        if self.lr_decay_ratio > 1.0:
            raise ConfigError("hyperparameter 'lr_decay_ratio': must be in [0, 1]")
        if self.lora_train_token_embeddings == "true" and (self.method != "lora" or self.deepspeed != "none"):
            raise ConfigError("hyperparameter 'lora_train_token_embeddings': needs method=lora without DeepSpeed")
        if not self.revision.strip():
            raise ConfigError("hyperparameter 'revision': must not be empty (the default branch is 'main')")
        if self.revision != DEFAULT_REVISION and self.model_id == EMBEDDED_MODEL_ID:
            raise ConfigError(
                "hyperparameter 'revision': the embedded default model has no revisions; set 'model_id' to a hub id"
            )
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("hyperparameter 'epochs': must be > 0 unless 'max_steps' is set")
        object.__setattr__(self, "report_to", ",".join(_trackers(self.report_to)) or "none")
        if self.eval_steps and self.load_best_model_at_end and self.save_steps % self.eval_steps:
            raise ConfigError(
                f"hyperparameter 'save_steps': {self.save_steps} must be a multiple of eval_steps={self.eval_steps}, "
                "so that the checkpoints saved for resuming were evaluated and can be compared (or set "
                "load_best_model_at_end=false)"
            )

    def use_retrieval(self, train_rows: int, documents: bool = False) -> bool:
        """Whether a job with `train_rows` training rows (and a documents channel or not) trains with retrieval,
        and ships an index."""
        if self.retrieval == "auto":
            return documents or train_rows >= RETRIEVAL_MIN_ROWS
        return self.retrieval == "on"

    @property
    def trackers(self) -> tuple[str, ...]:
        """The experiment trackers of `report_to`: () for none."""
        return _trackers(self.report_to)

    @property
    def train_token_embeddings(self) -> bool:
        """Whether LoRA also trains token embeddings. Not under DeepSpeed: checkpoints of PEFT's trainable tokens
        break under ZeRO-3 (huggingface/peft#2946). Full fine-tuning trains every embedding anyway."""
        if self.lora_train_token_embeddings == "auto":
            return self.method == "lora" and self.deepspeed == "none"
        return self.lora_train_token_embeddings == "true"

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3: each rank holds a shard of the weights, from loading until the final save gathers them."""
        return self.deepspeed in ("zero3", "zero3_offload")

    @property
    def lora_targets(self) -> str | list[str]:
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @classmethod
    def from_hyperparameters(cls, raw: dict[str, Any]) -> TrainConfig:
        """Build from hyperparameters.json content, in either SDK encoding; errors name the key."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        unknown = []
        for key, raw_value in raw.items():
            if key.startswith(_SDK_RESERVED_PREFIXES):
                continue
            name = {"instruction_column": "question_column", "response_column": "answer_column"}.get(key, key)
            if name not in known:
                unknown.append(key)
                continue
            decoded = _decode(raw_value)
            if name == "report_to" and isinstance(decoded, list):  # ["tensorboard", "mlflow"], as HF takes it
                decoded = ",".join(map(str, decoded))
            value = _coerce(key, decoded, known[name].type)
            choices = known[name].metadata.get("choices", ())
            if isinstance(value, str) and value.lower() in choices:  # "True" from str(True), "LoRA" as written
                value = value.lower()
            values[name] = value
        if unknown:
            raise ConfigError(
                f"unknown hyperparameter{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in sorted(unknown))}"
                f"; accepted: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRACKERS = ("tensorboard", "mlflow")


def _trackers(report_to: str) -> tuple[str, ...]:
    names = [n.strip().lower() for n in report_to.split(",") if n.strip()]
    if names == ["none"] or not names:
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"hyperparameter 'report_to': {report_to!r} names {', '.join(map(repr, unknown))}; expected none, "
            f"{', '.join(TRACKERS)}, or several of those comma-separated (tensorboard,mlflow)"
        )
    return tuple(dict.fromkeys(names))


def _decode(value: Any) -> Any:
    """Undo SDK v2's per-value JSON encoding; plain strings (SDK v3, raw API) pass through."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _coerce(key: str, value: Any, annotation: str) -> Any:
    kind = annotation if isinstance(annotation, str) else annotation.__name__
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(str(value).strip())
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        if isinstance(value, bool):  # "true" decoded by json.loads; the string field wants it back as written
            return "true" if value else "false"
        return str(value)
    except (TypeError, ValueError):
        expected = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(kind, "a string")
        raise ConfigError(f"hyperparameter '{key}': expected {expected}, got {value!r}") from None
