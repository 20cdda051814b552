"""Which engine serves the artifact (SERVE_ENGINE), decided without importing torch: the `serve` launcher needs
the answer before any worker starts (the OpenMP wait policy differs, see containers/serve/serve), and the worker
(serve.llamacpp.choose_loader) acts on the same answer.

`llamacpp` needs a GGUF in the artifact (manifest.json's `gguf`) and llama-cpp-python; `transformers` needs
neither; `auto` takes llama.cpp on a CPU when both are there, transformers otherwise (on a GPU always, for now:
the built-in engine batches there with CUDA kernels).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GgufEntry:
    """manifest.json's `gguf`: the artifact's GGUF file, its quantization and hash."""

    path: Path
    quantization: str
    sha256: str | None


@dataclass(frozen=True)
class Choice:
    engine: str  # "transformers" or "llamacpp"
    gguf: GgufEntry | None
    why: str  # for the log


class EngineUnavailable(Exception):
    """SERVE_ENGINE=llamacpp where it cannot run."""


def gguf_entry(model_dir: Path) -> GgufEntry | None:
    """The artifact's GGUF, as manifest.json names it; None when it has none."""
    try:
        manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    entry = manifest.get("gguf") if isinstance(manifest, dict) else None
    if not isinstance(entry, dict) or not entry.get("file"):
        return None
    return GgufEntry(Path(model_dir) / entry["file"], str(entry.get("quantization", "")), entry.get("sha256"))


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gpu_visible() -> bool:
    """An NVIDIA GPU this process may use, judged without CUDA (the launcher has not loaded torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1", "none", "NoDevFiles"):
        return False
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


def choose(engine: str, model_dir: Path, *, gpu: bool) -> Choice:
    entry = gguf_entry(model_dir)
    if engine == "transformers":
        return Choice("transformers", None, "SERVE_ENGINE=transformers")
    if engine == "llamacpp":
        if entry is None:
            raise EngineUnavailable(
                "SERVE_ENGINE=llamacpp, but the artifact has no GGUF (manifest.json names none): train with "
                "gguf_quantization=q8_0 (the default) or serve with SERVE_ENGINE=transformers"
            )
        if not llamacpp_installed():
            raise EngineUnavailable("SERVE_ENGINE=llamacpp, but llama-cpp-python is not installed here")
        return Choice("llamacpp", entry, "SERVE_ENGINE=llamacpp")
    if gpu:
        return Choice("transformers", None, "auto: a GPU is present")
    if entry is None:
        return Choice("transformers", None, "auto: the artifact has no GGUF")
    if not llamacpp_installed():
        return Choice("transformers", None, "auto: the artifact has a GGUF, but llama-cpp-python is not installed")
    return Choice("llamacpp", entry, f"auto: a CPU and the artifact's {entry.quantization} GGUF")
