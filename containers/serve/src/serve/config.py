"""ServeConfig: the one place that knows the SageMaker hosting env vars and our own knobs.

Everything else receives a frozen ServeConfig. Parsed once, at the edge (create_app / gunicorn.conf.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# How long a request thread waits on the engine beyond the generation budget before giving up on it.
RESULT_GRACE_S = 30.0


# auto: one worker per GPU when the model fits the smallest one, else device_map; with one GPU or none, as set
# by SAGEMAKER_MODEL_SERVER_WORKERS. per_gpu / device_map: that, whatever the model's size.
GPU_PLACEMENTS = ("auto", "per_gpu", "device_map")
# Set by gunicorn.conf.py for each worker it starts, never by hand: see WorkerSlot.
WORKER_SLOT_ENV = ("SERVE_WORKER_SLOT", "SERVE_WORKER_SLOTS", "SERVE_READY_DIR")


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
    max_batch_total_tokens: int | None = field(default=None, metadata={"env": "SERVE_MAX_BATCH_TOTAL_TOKENS"})
    trust_remote_code: bool = field(default=False, metadata={"env": "SERVE_TRUST_REMOTE_CODE"})
    torch_threads: int | None = field(default=None, metadata={"env": "SERVE_TORCH_THREADS"})
    dtype: str = field(default="auto", metadata={"env": "SERVE_DTYPE"})
    cpu_matmul: str = field(default="auto", metadata={"env": "SERVE_CPU_MATMUL"})
    graceful_timeout_s: int = field(default=25, metadata={"env": "SERVE_GRACEFUL_TIMEOUT"})
    # With several GPUs: one worker per GPU, or one worker with the model spread over all (see serve.placement).
    gpu_placement: str = field(default="auto", metadata={"env": "SERVE_GPU_PLACEMENT"})
    # Test hook: sleep this long before loading, so tests can watch /ping say 503 during a slow load.
    load_delay_s: float = field(default=0.0, metadata={"env": "SERVE_LOAD_DELAY_S"})

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
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{self._env(name)} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < self.max_batch_size:
            raise ConfigError(
                f"SERVE_MAX_QUEUE ({self.max_queue}) must be >= SERVE_MAX_BATCH_SIZE "
                f"({self.max_batch_size}): the queue counts running requests too"
            )
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            object.__setattr__(self, "default_max_new_tokens", self.max_new_tokens_cap)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"SERVE_DTYPE must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.cpu_matmul not in ("auto", "packed", "stock"):
            raise ConfigError(f"SERVE_CPU_MATMUL must be auto, packed or stock, got {self.cpu_matmul!r}")
        if self.gpu_placement not in GPU_PLACEMENTS:
            raise ConfigError(
                f"SERVE_GPU_PLACEMENT must be one of {', '.join(GPU_PLACEMENTS)}, got {self.gpu_placement!r}"
            )
        if self.graceful_timeout_s > 28:
            # SageMaker sends SIGKILL 30 s after SIGTERM; leave room to exit.
            raise ConfigError("SERVE_GRACEFUL_TIMEOUT must be <= 28 (SageMaker kills 30 s after SIGTERM)")

    @staticmethod
    def _env(name: str) -> str:
        return ServeConfig.__dataclass_fields__[name].metadata["env"]

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
        known = {meta.metadata["env"] for meta in dataclasses.fields(cls)} | {
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

        values: dict[str, object] = {}
        base_dir = env.get("SAGEMAKER_BASE_DIR", "/opt/ml")
        values["model_dir"] = Path(base_dir) / "model"
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if f.name == "model_dir" or name not in env or env[name] == "":
                continue
            values[f.name] = _parse(name, env[name], f.type)
        if "timeout_s" not in values and env.get("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"):
            values["timeout_s"] = _parse(
                "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", env["SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"], "int"
            )
        return cls(**values)


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
