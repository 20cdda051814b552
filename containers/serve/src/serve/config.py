"""ServeConfig: the one place that knows the SageMaker hosting env vars and our own knobs.

Everything else receives a frozen ServeConfig. Parsed once, at the edge (create_app / gunicorn.conf.py).
It also reads the env names of SageMaker's TGI and LMI (DJL Serving) containers where their meaning maps onto
ours (ALIASES, docs/serving.md "TGI and LMI environment names"), so a deployment written for those images
starts here too, or fails at start saying why.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# How long a request thread waits on the engine beyond the generation budget before giving up on it.
RESULT_GRACE_S = 30.0


# auto: one worker per GPU when the model fits the smallest one, else device_map; with one GPU or none, as set
# by SAGEMAKER_MODEL_SERVER_WORKERS. per_gpu / device_map: that, whatever the model's size.
GPU_PLACEMENTS = ("auto", "per_gpu", "device_map")
# auto: llama.cpp on a CPU when the artifact carries a GGUF (and llama-cpp-python is installed), else transformers.
ENGINES = ("auto", "transformers", "llamacpp")
# Set by gunicorn.conf.py for each worker it starts, never by hand: see WorkerSlot.
WORKER_SLOT_ENV = ("SERVE_WORKER_SLOT", "SERVE_WORKER_SLOTS", "SERVE_READY_DIR")


# Root members of an EMF metrics line (serve.metrics) that SERVE_METRICS_DIMENSIONS may not reuse.
EMF_RESERVED = frozenset(
    [
        "_aws",
        "Route",
        "StatusClass",
        "Status",
        "Stream",
        "FinishReason",
        "Requests",
        "Latency",
        "TimeToFirstToken",
        "TokensPerSecond",
        "PromptTokens",
        "GeneratedTokens",
        "QueueDepth",
    ]
)


class ConfigError(ValueError):
    """An env var has a value the server cannot run with."""


@dataclass(frozen=True)
class ServeConfig:
    """Serving settings. Each field names the env var it comes from (see docs/serving.md)."""

    model_dir: Path = field(default=Path("/opt/ml/model"), metadata={"env": "$SAGEMAKER_BASE_DIR/model"})
    host: str = field(default="0.0.0.0", metadata={"env": "SERVE_HOST"})
    port: int = field(default=8080, metadata={"env": "SAGEMAKER_BIND_TO_PORT"})
    workers: int = field(default=1, metadata={"env": "SAGEMAKER_MODEL_SERVER_WORKERS"})
    timeout_s: int = field(default=60, metadata={"env": "SAGEMAKER_MODEL_SERVER_TIMEOUT"})
    max_payload_mb: int = field(default=6, metadata={"env": "SAGEMAKER_MAX_PAYLOAD_IN_MB"})
    max_batch_size: int = field(default=32, metadata={"env": "SERVE_MAX_BATCH_SIZE"})
    max_queue: int = field(default=64, metadata={"env": "SERVE_MAX_QUEUE"})
    max_new_tokens_cap: int = field(default=1024, metadata={"env": "SERVE_MAX_NEW_TOKENS"})
    default_max_new_tokens: int = field(default=256, metadata={"env": "SERVE_DEFAULT_MAX_NEW_TOKENS"})
    max_input_tokens: int | None = field(default=None, metadata={"env": "SERVE_MAX_INPUT_TOKENS"})
    # The longest prompt (TGI's max_input_tokens); unset, a prompt may take the context but one token.
    max_prompt_tokens: int | None = field(default=None, metadata={"env": "SERVE_MAX_PROMPT_TOKENS"})
    max_batch_total_tokens: int | None = field(default=None, metadata={"env": "SERVE_MAX_BATCH_TOTAL_TOKENS"})
    trust_remote_code: bool = field(default=False, metadata={"env": "SERVE_TRUST_REMOTE_CODE"})
    torch_threads: int | None = field(default=None, metadata={"env": "SERVE_TORCH_THREADS"})
    dtype: str = field(default="auto", metadata={"env": "SERVE_DTYPE"})
    # Which engine runs the model: transformers (PyTorch), llamacpp (the artifact's GGUF), or auto (serve.predictor).
    engine: str = field(default="auto", metadata={"env": "SERVE_ENGINE"})
    cpu_matmul: str = field(default="auto", metadata={"env": "SERVE_CPU_MATMUL"})
    graceful_timeout_s: int = field(default=25, metadata={"env": "SERVE_GRACEFUL_TIMEOUT"})
    # With several GPUs: one worker per GPU, or one worker with the model spread over all (see serve.placement).
    gpu_placement: str = field(default="auto", metadata={"env": "SERVE_GPU_PLACEMENT"})
    # Use only the first N GPUs (None: every visible one); serve.placement decides how (SERVE_GPU_PLACEMENT).
    num_gpus: int | None = field(default=None, metadata={"env": "SERVE_NUM_GPUS"})
    # emf: one CloudWatch Embedded Metric Format line per request on stdout; off: none (see serve.metrics).
    metrics: str = field(default="emf", metadata={"env": "SERVE_METRICS"})
    metrics_namespace: str = field(default="LLMFineTune/Serving", metadata={"env": "SERVE_METRICS_NAMESPACE"})
    # Extra EMF dimensions, `Name=value,Name=value` (SageMaker does not tell the container its endpoint's name).
    metrics_dimensions: str = field(default="", metadata={"env": "SERVE_METRICS_DIMENSIONS"})
    # Test hook: sleep this long before loading, so tests can watch /ping say 503 during a slow load.
    load_delay_s: float = field(default=0.0, metadata={"env": "SERVE_LOAD_DELAY_S"})
    # Not settings: which env name set a field when it was not our own (an alias), for error messages; and
    # what start-up should log about the aliases it read (accepted, ignored).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    notices: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        positive = (
            "port",
            "workers",
            "timeout_s",
            "max_payload_mb",
            "max_batch_size",
            "max_queue",
            "max_new_tokens_cap",
            "default_max_new_tokens",
            "graceful_timeout_s",
        )
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"{self.env_name('max_prompt_tokens')} must be >= 1, got {self.max_prompt_tokens}")
        if self.num_gpus is not None and self.num_gpus < 1:
            raise ConfigError(f"{self.env_name('num_gpus')} must be >= 1, got {self.num_gpus}")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.env_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < self.max_batch_size:
            raise ConfigError(
                f"{self.env_name('max_queue')} ({self.max_queue}) must be >= {self.env_name('max_batch_size')} "
                f"({self.max_batch_size}): the queue counts running requests too"
            )
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            object.__setattr__(self, "default_max_new_tokens", self.max_new_tokens_cap)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"{self.env_name('dtype')} must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.engine not in ENGINES:
            raise ConfigError(f"SERVE_ENGINE must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.cpu_matmul not in ("auto", "packed", "stock"):
            raise ConfigError(f"SERVE_CPU_MATMUL must be auto, packed or stock, got {self.cpu_matmul!r}")
        if self.metrics not in ("emf", "off"):
            raise ConfigError(f"SERVE_METRICS must be emf or off, got {self.metrics!r}")
        if not 1 <= len(self.metrics_namespace) <= 255:
            raise ConfigError("SERVE_METRICS_NAMESPACE must be 1 to 255 characters (a CloudWatch namespace)")
        self.emf_dimensions  # noqa: B018 - parsed here so that a bad value fails at start
        if self.gpu_placement not in GPU_PLACEMENTS:
            raise ConfigError(
                f"{self.env_name('gpu_placement')} must be one of {', '.join(GPU_PLACEMENTS)}, "
                f"got {self.gpu_placement!r}"
            )
        if self.graceful_timeout_s > 28:
            # SageMaker sends SIGKILL 30 s after SIGTERM; leave room to exit.
            raise ConfigError("SERVE_GRACEFUL_TIMEOUT must be <= 28 (SageMaker kills 30 s after SIGTERM)")

    def env_name(self, name: str) -> str:
        """The env name a field's value came from, for messages: ours, or `ALIAS (= SERVE_...)`."""
        own = ServeConfig.__dataclass_fields__[name].metadata["env"]
        alias = self.sources.get(name)
        return f"{alias} (= {own})" if alias else own

    @property
    def emf_dimensions(self) -> dict[str, str]:
        """SERVE_METRICS_DIMENSIONS as {Name: value}, in order."""
        dimensions: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.metrics_dimensions.split(","))):
            name, sep, value = (part.strip() for part in item.partition("="))
            if not (sep and name and value):
                raise ConfigError(f"SERVE_METRICS_DIMENSIONS: {item!r} is not Name=value")
            if name in EMF_RESERVED:
                raise ConfigError(f"SERVE_METRICS_DIMENSIONS: {name!r} is a name the metrics lines use themselves")
            dimensions[name] = value
        if len(dimensions) > 28:  # an EMF dimension set holds at most 30; the lines add Route and StatusClass
            raise ConfigError(f"SERVE_METRICS_DIMENSIONS: {len(dimensions)} dimensions, at most 28")
        return dimensions

    @property
    def max_payload_bytes(self) -> int:
        return self.max_payload_mb * 1024 * 1024

    @property
    def generation_budget_s(self) -> float:
        """How long one request may generate: the server timeout minus a margin to send the reply."""
        return max(1.0, self.timeout_s - min(5.0, self.timeout_s * 0.1))

    @property
    def result_timeout_s(self) -> float:
        """How long a request waits for the engine's next event (the engine itself stops at the budget)."""
        return self.generation_budget_s + RESULT_GRACE_S

    @property
    def threads_per_worker(self) -> int:
        """gunicorn gthread threads: every queued request holds one, plus a few so /ping always finds one."""
        return self.max_queue + 4

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeConfig:
        env = os.environ if environ is None else environ
        known = {f.metadata["env"] for f in dataclasses.fields(cls) if "env" in f.metadata} | {
            "SAGEMAKER_BASE_DIR",
            # Set by SageMaker / its SDKs; harmless to us.
            "SAGEMAKER_PROGRAM",
            "SAGEMAKER_SUBMIT_DIRECTORY",
            "SAGEMAKER_CONTAINER_LOG_LEVEL",
            "SAGEMAKER_REGION",
            "SAGEMAKER_SAFE_PORT_RANGE",
            "SAGEMAKER_BATCH",
            "SAGEMAKER_BATCH_STRATEGY",
            "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS",
            "SAGEMAKER_MULTI_MODEL",
            "SAGEMAKER_INFERENCE_ACCELERATOR_PRESENT",
            *WORKER_SLOT_ENV,
        }
        unknown = sorted(k for k in env if k.startswith("SERVE_") and k not in known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {unknown}; known SERVE_* settings: "
                f"{sorted(k for k in known if k.startswith('SERVE_'))}"
            )
        unknown = sorted(k for k in env if k.startswith("OPTION_") and k not in ALIASES)
        if unknown:
            raise ConfigError(
                f"unknown LMI setting(s) {unknown}: this server is not DJL Serving; the OPTION_* names it reads "
                f"are {sorted(k for k in ALIASES if k.startswith('OPTION_'))} (see docs/serving.md)"
            )

        values: dict[str, object] = {}
        base_dir = env.get("SAGEMAKER_BASE_DIR", "/opt/ml")
        values["model_dir"] = Path(base_dir) / "model"
        for f in dataclasses.fields(cls):
            name = f.metadata.get("env")
            if name is None or f.name == "model_dir" or name not in env or env[name] == "":
                continue
            values[f.name] = _parse(name, env[name], f.type)
        if "timeout_s" not in values and env.get("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"):
            values["timeout_s"] = _parse(
                "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", env["SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"], "int"
            )
        sources, notices = _apply_aliases(env, values)
        return cls(**values, sources=sources, notices=tuple(notices))


@dataclass(frozen=True)
class WorkerSlot:
    """Which of the server's worker slots this process holds, and where every worker marks itself ready.

    Not a setting: gunicorn.conf.py gives each worker it starts a slot (0 .. slots-1; a replacement worker takes
    over the slot of the one it replaces) through these env vars. Outside gunicorn there is none.
    """

    index: int
    slots: int
    ready_dir: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSlot | None:
        env = os.environ if environ is None else environ
        slot, slots, ready_dir = (env.get(name, "") for name in WORKER_SLOT_ENV)
        if not (slot and slots and ready_dir):
            return None
        try:
            index, count = int(slot), int(slots)
        except ValueError as e:
            raise ConfigError(f"SERVE_WORKER_SLOT={slot!r} / SERVE_WORKER_SLOTS={slots!r} are not numbers") from e
        if not 0 <= index < count:
            raise ConfigError(f"SERVE_WORKER_SLOT={index} is not a slot of SERVE_WORKER_SLOTS={count}")
        return cls(index, count, Path(ready_dir))

    def env(self) -> dict[str, str]:
        return dict(zip(WORKER_SLOT_ENV, (str(self.index), str(self.slots), str(self.ready_dir)), strict=True))


# ----- TGI and LMI env names -----
# SageMaker's TGI image (text-generation-launcher's flags as env vars, and its entrypoint's HF_MODEL_ID,
# SM_NUM_GPUS, ...) and LMI image (DJL Serving: `option.x` as OPTION_X, plus shortcuts) are configured by
# env vars. Where a name means something we have, it sets that; names we have no meaning for are refused or,
# when harmless, accepted and logged; never silently dropped. Our own name wins: set both to different values
# and start-up fails naming both. The table in docs/serving.md says the same per name.

Convert = Callable[[str, str], dict[str, object]]  # (env name, raw value) -> {ServeConfig field: value}


@dataclass(frozen=True)
class Alias:
    """One TGI / LMI env name: `convert` maps its value onto our fields (`note`, if any, is logged with it);
    else `ignored` says why it is accepted with no effect (logged), or `refused` why start-up fails."""

    convert: Convert | None = None
    note: str = ""
    ignored: str = ""
    refused: str = ""


def _to(field_name: str, kind: str) -> Convert:
    return lambda name, raw: {field_name: _parse(name, raw, kind)}


def _positive(name: str, raw: str) -> int:
    value = _parse(name, raw, "int")
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    return value


def _model_id(name: str, raw: str) -> dict[str, object]:
    """A local path is the model directory; a hub id or an S3 URI is not something this server fetches."""
    where = (
        "this server does not download models: it serves the model directory SageMaker mounts at /opt/ml/model. "
        "Give the model as the SageMaker model's data (ModelDataUrl: a model.tar.gz, or an S3 prefix holding the "
        "saved directory; e.g. `huggingface-cli download ID --local-dir model`, then upload it), and leave "
        f"{name} unset or set it to /opt/ml/model"
    )
    if raw.startswith("s3://"):
        raise ConfigError(f"{name}={raw!r} is an S3 location; {where}")
    path = Path(raw).expanduser()
    if not (path.is_absolute() or raw.startswith(".") or path.is_dir()):
        raise ConfigError(f"{name}={raw!r} looks like a Hugging Face Hub model id; {where}")
    return {"model_dir": Path(os.path.normpath(path))}


def _dtype(choices: Mapping[str, str]) -> Convert:
    def convert(name: str, raw: str) -> dict[str, object]:
        if raw.strip().lower() not in choices:
            raise ConfigError(
                f"{name}={raw!r} is not a type this server loads models in; use one of {sorted(choices)} "
                "(quantized types are not supported)"
            )
        return {"dtype": choices[raw.strip().lower()]}

    return convert


def _tensor_parallel(name: str, raw: str) -> dict[str, object]:
    """LMI: the GPUs one model copy is sharded across; `max`: all of them (as many copies as fit the rest)."""
    if raw.strip().lower() == "max":
        return {"gpu_placement": "device_map"}
    degree = _positive(name, raw)
    if degree == 1:
        return {"gpu_placement": "per_gpu"}
    return {"gpu_placement": "device_map", "num_gpus": degree}


def _rolling_batch(name: str, raw: str) -> dict[str, object]:
    if raw.strip().lower() != "auto":
        raise ConfigError(
            f"{name}={raw!r}: this server runs its own continuous-batching engine, not vLLM, lmi-dist or "
            f"TensorRT-LLM, and always batches; set {name}=auto or unset it"
        )
    return {}


def _max_prompt_tokens(name: str, raw: str) -> dict[str, object]:
    return {"max_prompt_tokens": _positive(name, raw)}  # checked against the context in _apply_aliases


_TGI_IGNORED = "a TGI tuning flag with no counterpart here (our engine schedules on its own)"
_FEATURE = "changes how the model computes, and this server does not support it; unset it"
ALIASES: dict[str, Alias] = {
    # The model directory
    "HF_MODEL_ID": Alias(_model_id),
    "OPTION_MODEL_ID": Alias(_model_id),
    "HF_MODEL_REVISION": Alias(refused="a hub revision; this server serves the mounted model directory as it is"),
    "OPTION_REVISION": Alias(refused="a hub revision; this server serves the mounted model directory as it is"),
    # GPUs
    "SM_NUM_GPUS": Alias(
        lambda name, raw: {"num_gpus": _positive(name, raw)},
        note="TGI shards one model copy over them; here SERVE_GPU_PLACEMENT decides (device_map to shard)",
    ),
    "NUM_SHARD": Alias(
        lambda name, raw: {"num_gpus": _positive(name, raw)},
        note="TGI shards one model copy over them; here SERVE_GPU_PLACEMENT decides (device_map to shard)",
    ),
    "OPTION_TENSOR_PARALLEL_DEGREE": Alias(_tensor_parallel),
    "TENSOR_PARALLEL_DEGREE": Alias(_tensor_parallel),
    # Lengths and batches
    "MAX_TOTAL_TOKENS": Alias(
        _to("max_input_tokens", "int"),
        note="prompt + answer; an answer that reaches it ends with finish_reason length (TGI answers 422)",
    ),
    "OPTION_MAX_MODEL_LEN": Alias(_to("max_input_tokens", "int"), note="prompt + answer"),
    "MAX_INPUT_TOKENS": Alias(
        _max_prompt_tokens,
        note="the longest prompt; a longer one is refused (422) unless parameters.truncate cuts it",
    ),
    "MAX_INPUT_LENGTH": Alias(
        _max_prompt_tokens,
        note="the longest prompt; a longer one is refused (422) unless parameters.truncate cuts it",
    ),
    "MAX_BATCH_TOTAL_TOKENS": Alias(_to("max_batch_total_tokens", "int")),
    "MAX_BATCH_SIZE": Alias(_to("max_batch_size", "int")),
    "OPTION_MAX_ROLLING_BATCH_SIZE": Alias(_to("max_batch_size", "int")),
    "MAX_CONCURRENT_REQUESTS": Alias(
        _to("max_queue", "int"), note="per worker: each gunicorn worker has its own queue"
    ),
    "MAX_BATCH_PREFILL_TOKENS": Alias(ignored="prefills are bounded by SERVE_MAX_BATCH_TOTAL_TOKENS"),
    "OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS": Alias(ignored="prefills are bounded by SERVE_MAX_BATCH_TOTAL_TOKENS"),
    "OPTION_ROLLING_BATCH": Alias(_rolling_batch, note="this server always batches continuously"),
    # The model's code and types
    "HF_MODEL_TRUST_REMOTE_CODE": Alias(_to("trust_remote_code", "bool")),
    "TRUST_REMOTE_CODE": Alias(_to("trust_remote_code", "bool")),
    "OPTION_TRUST_REMOTE_CODE": Alias(_to("trust_remote_code", "bool")),
    "DTYPE": Alias(_dtype({"float16": "float16", "bfloat16": "bfloat16"})),
    "OPTION_DTYPE": Alias(
        _dtype(
            {
                "auto": "auto",
                "fp32": "float32",
                "float32": "float32",
                "fp16": "float16",
                "float16": "float16",
                "bf16": "bfloat16",
                "bfloat16": "bfloat16",
            }
        )
    ),
    "HF_MODEL_QUANTIZE": Alias(refused=_FEATURE),
    "QUANTIZE": Alias(refused=_FEATURE),
    "OPTION_QUANTIZE": Alias(refused=_FEATURE),
    "SPECULATE": Alias(refused=_FEATURE),
    "KV_CACHE_DTYPE": Alias(refused=_FEATURE),
    "ROPE_SCALING": Alias(refused=_FEATURE),
    "ROPE_FACTOR": Alias(refused=_FEATURE),
    "LORA_ADAPTERS": Alias(refused="adapters are merged into the model at start: put the adapter in /opt/ml/model"),
    "OPTION_ENTRYPOINT": Alias(refused="this server has no custom handlers; it serves the model directory itself"),
    # Accepted, no effect here (logged at start)
    "MESSAGES_API_ENABLED": Alias(ignored="/invocations always accepts both TGI and OpenAI chat bodies"),
    "OPTION_MODEL_LOADING_TIMEOUT": Alias(
        ignored="SageMaker's ContainerStartupHealthCheckTimeoutInSeconds bounds the load"
    ),
    "MAX_WAITING_TOKENS": Alias(ignored=_TGI_IGNORED),
    "WAITING_SERVED_RATIO": Alias(ignored=_TGI_IGNORED),
    "CUDA_GRAPHS": Alias(ignored=_TGI_IGNORED),
    "CUDA_MEMORY_FRACTION": Alias(ignored="set SERVE_MAX_BATCH_TOTAL_TOKENS to bound the KV cache instead"),
    "VALIDATION_WORKERS": Alias(ignored=_TGI_IGNORED),
    "MAX_BEST_OF": Alias(ignored="best_of may only be 1 here (another value gets a 422)"),
    "MAX_TOP_N_TOKENS": Alias(ignored="top_n_tokens is at most 5 here (TGI's default)"),
    "MAX_STOP_SEQUENCES": Alias(ignored="a request may give at most 4 stop strings (TGI's default)"),
    "MAX_CLIENT_BATCH_SIZE": Alias(ignored="`inputs` may be a list of up to 32 strings"),
    "JSON_OUTPUT": Alias(ignored="request lines are JSON already; other lines are plain text"),
    "DISABLE_CUSTOM_KERNELS": Alias(ignored=_TGI_IGNORED),
    "HF_HUB_ENABLE_HF_TRANSFER": Alias(ignored="nothing is downloaded"),
    "USAGE_STATS": Alias(ignored="this server sends no usage statistics"),
}


def _apply_aliases(env: Mapping[str, str], values: dict[str, object]) -> tuple[dict[str, str], list[str]]:
    """Fold the TGI / LMI names set in `env` into `values` (our own settings, already parsed). Returns which
    alias set each field, and the lines start-up logs about them."""
    own = {name for name in values if name != "model_dir"}
    if env.get("SAGEMAKER_BASE_DIR"):
        own.add("model_dir")
    sources: dict[str, str] = {}
    notices: list[str] = []
    for name, alias in ALIASES.items():
        raw = env.get(name, "")
        if raw == "":
            continue
        if alias.refused:
            raise ConfigError(f"{name}={raw!r}: {alias.refused}")
        if alias.ignored:
            notices.append(f"{name}={raw}: accepted and ignored: {alias.ignored}")
            continue
        assert alias.convert is not None
        mapped = alias.convert(name, raw)
        for field_name, value in mapped.items():
            other = _own_name(field_name) if field_name in own else sources.get(field_name)
            if other is None:
                values[field_name], sources[field_name] = value, name
            elif values[field_name] != value:
                shown = f"{other}={env[other]!r}" + (
                    " (model directory: $SAGEMAKER_BASE_DIR/model)" if other == "SAGEMAKER_BASE_DIR" else ""
                )
                raise ConfigError(
                    f"{name}={raw!r} and {shown} disagree; set only one of them"
                    + (f" ({other} is this server's own setting)" if field_name in own else "")
                )
        read = ", ".join(
            f"the model directory {v}" if k == "model_dir" else f"{_own_name(k)}={v}"
            for k, v in mapped.items()
            if not k.startswith("_")
        )
        notices.append(
            f"{name}={raw}: " + (f"read as {read}" if read else "accepted") + (f"; {alias.note}" if alias.note else "")
        )
    prompt = values.get("max_prompt_tokens")
    context = values.get("max_input_tokens")
    if prompt is not None and context is not None and prompt >= context:
        context_name = sources.get("max_input_tokens") or _own_name("max_input_tokens")
        prompt_name = sources.get("max_prompt_tokens") or _own_name("max_prompt_tokens")
        raise ConfigError(f"{prompt_name}={prompt} must be < {context_name}={context} (prompt + answer), as in TGI")
    return sources, notices


def _own_name(field_name: str) -> str:
    if field_name == "model_dir":
        return "SAGEMAKER_BASE_DIR"
    if field_name.startswith("_"):
        return field_name
    return ServeConfig.__dataclass_fields__[field_name].metadata["env"]


def _parse(name: str, raw: str, type_name: str) -> object:
    kind = str(type_name)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes"):
                return True
            if lowered in ("0", "false", "no"):
                return False
            raise ValueError(raw)
        return raw
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}") from e
