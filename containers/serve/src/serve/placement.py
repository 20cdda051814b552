"""Where the workers run on a machine with GPUs (SERVE_GPU_PLACEMENT): one worker per GPU, each seeing only its
own device, or one worker with the model spread over all of them (`device_map`). gunicorn.conf.py decides it once,
in gunicorn's master, before it forks the workers, and hands each worker its share as env vars.

No torch here, and no CUDA call: a CUDA driver initialised in the master does not work in the workers forked from
it. The GPUs are listed by `nvidia-smi` ($CUDA_VISIBLE_DEVICES, when set, narrows them down), and the model's size
is read from its safetensors headers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from serve.config import ConfigError, ServeConfig

log = logging.getLogger("serve.placement")

# A model fits a GPU when its weights take at most this share of the GPU's memory: the rest holds the CUDA context,
# the activations and the KV cache of a full batch (SERVE_MAX_BATCH_SIZE sequences).
FIT_FRACTION = 0.7
NVIDIA_SMI = ("nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits")
# Floating tensors are cast to the serving dtype at load; the others keep their stored size.
_FLOATS = {"F64", "F32", "F16", "BF16"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    id: str  # how CUDA_VISIBLE_DEVICES names it: its UUID (GPU-...), or the entry $CUDA_VISIBLE_DEVICES gave
    memory_bytes: int | None  # None: unknown


@dataclass(frozen=True)
class Plan:
    """`shared`: SAGEMAKER_MODEL_SERVER_WORKERS workers that each see every device (no GPU, or one), as before
    SERVE_GPU_PLACEMENT existed. `per_gpu`: worker slot i sees only gpus[i]. `device_map`: one worker, all GPUs."""

    kind: str
    workers: int
    gpus: tuple[Gpu, ...]
    reason: str  # one line for the log
    # SERVE_NUM_GPUS left some visible GPUs out: CUDA_VISIBLE_DEVICES for workers that see all of `gpus`.
    visible: str | None = None

    def worker_env(self, slot: int) -> dict[str, str]:
        """The env vars worker `slot` needs before torch loads in it. SERVE_GPU_PLACEMENT becomes what `auto`
        resolved to (the loader spreads the model only under `device_map`), and SAGEMAKER_MODEL_SERVER_WORKERS the
        number of workers actually running (each takes its share of the CPU cores)."""
        env = {"SAGEMAKER_MODEL_SERVER_WORKERS": str(self.workers)}
        if self.kind == "per_gpu":
            env.update(CUDA_VISIBLE_DEVICES=self.gpus[slot].id, SERVE_GPU_PLACEMENT="per_gpu")
        elif self.kind == "device_map":
            env["SERVE_GPU_PLACEMENT"] = "device_map"
        if self.kind != "per_gpu" and self.visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible
        return env


def plan_for(config: ServeConfig, gpus: Sequence[Gpu] | None = None) -> Plan:
    """The plan for this machine; `gpus` (tests) replaces what visible_gpus() finds."""
    gpus = visible_gpus() if gpus is None else gpus
    visible = len(gpus)
    if config.num_gpus is not None:  # SERVE_NUM_GPUS, or TGI's SM_NUM_GPUS: the first N
        if config.num_gpus > visible:
            raise ConfigError(
                f"{config.env_name('num_gpus')}={config.num_gpus} asks for {config.num_gpus} GPU(s), and nvidia-smi "
                f"lists {visible} that {'is' if visible == 1 else 'are'} visible"
            )
        gpus = list(gpus)[: config.num_gpus]
    weights = None
    if config.gpu_placement == "auto" and len(gpus) > 1:
        weights = weight_bytes(config.model_dir, config.dtype)
    try:
        plan = choose(config.gpu_placement, config.workers, gpus, weights)
    except ConfigError as e:
        if config.sources.get("gpu_placement"):
            raise ConfigError(f"{e} (set by {config.env_name('gpu_placement')})") from e
        raise
    if len(gpus) < visible:
        ids = ",".join(g.id for g in gpus)
        return replace(
            plan, visible=ids, reason=f"{plan.reason}; {config.env_name('num_gpus')}: GPUs {ids} of {visible}"
        )
    return plan


def choose(setting: str, workers: int, gpus: Sequence[Gpu], weights: int | None) -> Plan:
    """The decision itself: SERVE_GPU_PLACEMENT, SAGEMAKER_MODEL_SERVER_WORKERS, the visible GPUs and the bytes
    the model's weights take on a GPU (None: unknown) -> a plan."""
    gpus, count = tuple(gpus), len(gpus)
    if count == 0 and setting != "auto":
        raise ConfigError(f"SERVE_GPU_PLACEMENT={setting} needs a GPU, and nvidia-smi lists none that is visible")
    if setting == "auto" and count <= 1:
        where = "one GPU" if count else "no GPU"
        return Plan("shared", workers, gpus, f"{where}: {workers} worker(s) (SAGEMAKER_MODEL_SERVER_WORKERS)")
    ignored = f"; SAGEMAKER_MODEL_SERVER_WORKERS={workers} does not apply" if workers != 1 else ""
    if setting == "per_gpu":
        return Plan("per_gpu", count, gpus, f"SERVE_GPU_PLACEMENT=per_gpu: one worker on each of {count} GPUs{ignored}")
    spread = f"one worker, the model spread over {count} GPUs (device_map=auto){ignored}"
    if setting == "device_map":
        return Plan("device_map", 1, gpus, f"SERVE_GPU_PLACEMENT=device_map: {spread}")
    known = [g.memory_bytes for g in gpus if g.memory_bytes]
    if weights is None or not known:
        assumed = f"model or GPU size unknown, so assumed to fit: one worker on each of {count} GPUs{ignored}"
        return Plan("per_gpu", count, gpus, assumed)
    smallest = min(known)
    if weights <= FIT_FRACTION * smallest:
        return Plan(
            "per_gpu",
            count,
            gpus,
            f"the weights ({_gib(weights)}) fit the smallest of {count} GPUs ({_gib(smallest)}, "
            f"{FIT_FRACTION:.0%} for weights): one worker on each{ignored}",
        )
    reason = f"the weights ({_gib(weights)}) do not fit one GPU ({_gib(smallest)}, {FIT_FRACTION:.0%} for weights): "
    if weights > FIT_FRACTION * smallest * count:
        reason += "more than all GPUs hold, so some layers run from CPU memory (slowly); "
    return Plan("device_map", 1, gpus, reason + spread)


def visible_gpus(environ: Mapping[str, str] | None = None, query: Callable[[], str | None] | None = None) -> list[Gpu]:
    """The GPUs this server may use: nvidia-smi's list, narrowed to $CUDA_VISIBLE_DEVICES when it is set.

    An entry of $CUDA_VISIBLE_DEVICES is kept as it is written (an index, a UUID or its prefix, a MIG device), so a
    worker given it sees the same device CUDA would show; as in CUDA, the list ends at the first entry naming no
    device. An index is matched to nvidia-smi's index (PCI order) only to read its memory size.
    """
    env = os.environ if environ is None else environ
    listed = _parse_nvidia_smi((query or nvidia_smi)())
    chosen = env.get("CUDA_VISIBLE_DEVICES")
    if chosen is None:
        return [Gpu(uuid or index, memory) for index, uuid, memory in listed]
    gpus = []
    for entry in (e.strip() for e in chosen.split(",")):
        row = next((r for r in listed if entry == r[0] or (entry.startswith("GPU-") and r[1].startswith(entry))), None)
        if row is None and not entry.startswith("MIG-"):
            break
        gpus.append(Gpu(entry, row[2] if row else None))
    return gpus


def nvidia_smi() -> str | None:
    """nvidia-smi's GPU list as CSV; None without nvidia-smi or when it fails (no driver: no GPU to place)."""
    try:
        done = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("nvidia-smi failed (%s); placing the workers as on a machine without GPUs", e)
        return None
    if done.returncode != 0:
        log.warning(
            "nvidia-smi exited with %d (%s); placing the workers as on a machine without GPUs",
            done.returncode,
            done.stderr.strip()[:200] or done.stdout.strip()[:200],
        )
        return None
    return done.stdout


def _parse_nvidia_smi(text: str | None) -> list[tuple[str, str, int | None]]:
    """(index, uuid, memory in bytes) per line of `index, uuid, memory.total [MiB]`."""
    rows = []
    for line in (text or "").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or not fields[0].isdigit():
            continue
        memory = int(fields[2]) * 1024 * 1024 if fields[2].isdigit() else None
        rows.append((fields[0], fields[1], memory))
    return rows


def weight_bytes(model_dir: Path, dtype: str) -> int | None:
    """The bytes the model's weights take on a GPU with SERVE_DTYPE `dtype`, from the safetensors headers (None:
    unknown, e.g. a LoRA adapter whose base is a hub id). `auto` serves in 16 bits on a GPU (an fp32 artifact in
    bf16, see serve.artifact), so only `float32` keeps 4 bytes per floating element."""
    directories = [Path(model_dir)]
    adapter = directories[0] / "adapter_config.json"
    if adapter.exists() and not (directories[0] / "config.json").exists():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
        if not base or not Path(base).is_dir():
            return None
        directories.append(Path(base))
    files = [f for d in directories for f in sorted(d.glob("*.safetensors"))]
    if not files:
        return None
    float_size = 4 if dtype == "float32" else 2
    total = 0
    for path in files:
        header = _safetensors_header(path)
        if header is None:
            return None
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            if tensor["dtype"] in _FLOATS:
                total += math.prod(tensor["shape"]) * float_size
            else:
                start, end = tensor["data_offsets"]
                total += end - start
    return total


def _safetensors_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file: an 8-byte little-endian length, then that many bytes of JSON."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return header if isinstance(header, dict) else None


def claim_slot(slots: int, held: Sequence[int]) -> int:
    """The slot for a new worker, given the slots the live workers hold: the lowest free one, so a replacement
    takes over the slot (and the GPU) of the worker it replaces; while a reload (SIGHUP) runs old and new workers
    side by side, the least shared one."""
    counts = [0] * slots
    for slot in held:
        if 0 <= slot < slots:
            counts[slot] += 1
    return min(range(slots), key=lambda slot: (counts[slot], slot))


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"
