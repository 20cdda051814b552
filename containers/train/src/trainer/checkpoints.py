"""The checkpoints a job resumes from: which ones count, and what loading one may run (nothing).

A checkpoint counts once every process has saved its part. After the Trainer's save, every rank waits for the
others, then one process per host writes COMPLETE_MARKER into checkpoint-N: the size of every file there, each
rank's optimizer shard and RNG state included. Resume takes the newest checkpoint whose marker is there and whose
files still have those sizes. The Trainer's own last file, trainer_state.json, does not prove this: rank 0 writes
it without waiting for the other ranks' RNG state (and under DeepSpeed, their last writes), and a copy of the
directory (SageMaker's S3 sync) can carry it without a file written earlier.

Resuming runs no code from the checkpoint. Before anything is loaded, every pickle the resume may read (`*.pt`,
`*.pth`, `*.bin`) is read as pickle opcodes, without running them, and refused with a CheckpointError unless it
holds only tensors, plain data and the classes in `resume_globals`. While resuming, every `torch.load` in the
process also runs with weights_only=True and the same allowed classes: torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD
overrides the weights_only=False that DeepSpeed's checkpoint engine passes.

No torch at import: the heavy imports are inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import CheckpointError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# The Trainer saves its TrainingArguments as a pickle, for people; resuming never loads it.
NEVER_LOADED = ("training_args.bin",)
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def last_complete_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest checkpoint-N that `mark_complete` marked and that still holds every file it listed, at the
    listed size. Others were cut off while being saved (SIGKILL, full disk) or copied in part, and are skipped,
    never loaded. (transformers' get_last_checkpoint takes the highest step number, complete or not.)"""
    candidates = [p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    for path in sorted(candidates, key=lambda p: int(p.name[11:]), reverse=True):
        missing = _missing_files(path)
        if missing is None:
            return str(path)
        log.warning("skipping incomplete checkpoint %s (cut off while it was being saved: %s)", path, missing)
    return None


def mark_complete(checkpoint: Path, global_step: int) -> Path:
    """Write COMPLETE_MARKER into `checkpoint`, listing the size of every file in it; call it once every process
    has saved its part. Written to a temporary name and renamed, so a marker is whole or absent."""
    files = {
        str(p.relative_to(checkpoint)): p.stat().st_size
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(f".{COMPLETE_MARKER}")
    }
    marker = checkpoint / COMPLETE_MARKER
    # A name of its own per host and process: hosts that share the directory may mark it at the same time.
    tmp = checkpoint / f".{COMPLETE_MARKER}.{socket.gethostname()}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"global_step": global_step, "files": files}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
    return marker


def _missing_files(checkpoint: Path) -> str | None:
    """Why `checkpoint` is not complete, or None when it is."""
    try:
        listed = json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no {COMPLETE_MARKER}"
    for name, size in listed.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    return None


def resume_globals(deepspeed: bool) -> list:
    """The classes a checkpoint may hold besides tensors and plain data, each only data when loaded: numpy's
    array and dtype (the Trainer's RNG state; transformers allows the same three), and under DeepSpeed the ZeRO
    optimizer state's stage enum, loss scaler and parameter-fragment addresses."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed it
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    if deepspeed:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    return allowed


def refuse_unsafe_pickles(checkpoint: Path, deepspeed: bool) -> None:
    """Raise CheckpointError, before any file of `checkpoint` is loaded, if a pickle the resume may load names
    anything but `resume_globals` (a class or function that unpickling would call: code execution)."""
    import torch

    refused = []
    with torch.serialization.safe_globals(resume_globals(deepspeed)):
        for path in sorted(checkpoint.rglob("*")):
            if path.suffix not in PICKLE_SUFFIXES or not path.is_file() or path.name in NEVER_LOADED:
                continue
            name = str(path.relative_to(checkpoint))
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except (ValueError, RuntimeError, OSError) as e:  # not a torch.save zip archive: an older or other format
                refused.append(f"{name} (not a torch.save archive: {e})")
                continue
            if unsafe:
                refused.append(f"{name} ({', '.join(sorted(unsafe))})")
    if refused:
        raise CheckpointError(
            f"refusing to resume from {checkpoint}: it holds pickles that would call code when loaded, where only "
            f"tensors and plain data belong: {'; '.join(refused)}. Something other than this trainer wrote them. "
            "Remove that checkpoint directory to resume from an earlier one (or the checkpoint location to start "
            "over), and check who can write to it."
        )


@contextlib.contextmanager
def weights_only_loading(deepspeed: bool) -> Iterator[None]:
    """Inside, every torch.load in this process loads tensors and plain data only (weights_only=True, also where
    the caller asks for weights_only=False), plus `resume_globals`; a pickle naming anything else raises
    pickle.UnpicklingError instead of running."""
    import torch

    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(resume_globals(deepspeed)):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous
