"""The artifact as GGUF too, for llama.cpp (the serving image's CPU engine), written with llama.cpp's own converter.

The converter is `convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/` folders, taken from the pinned
llama-cpp-python sdist on PyPI (its vendored llama.cpp; docker/install_gguf_converter.py puts them under
`<prefix>/share/llama.cpp/` and records where they came from in SOURCE.json). Why not the `gguf` package alone:
the converter, which knows each architecture's tensor names and tokenizer, is not in it.

`q8_0` is written by the converter directly. `q4_k_m` and `q4_0` need llama.cpp's quantizer (C++): an f16 GGUF
is converted, then quantized through llama-cpp-python's `llama_model_quantize` where that is installed.

A base the converter does not support, a missing converter or quantizer: the job logs why and the artifact keeps
its safetensors alone. Never a failed job: the GGUF is an extra.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from .artifact import file_sha256

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "q8_0", "q4_k_m", "q4_0")
# What llama.cpp's quantizer is asked for, from an f16 conversion (q8_0 the converter writes itself).
QUANTIZER_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
CONVERTER_ENV = "LLMFT_GGUF_CONVERTER"  # a convert_hf_to_gguf.py elsewhere than <prefix>/share/llama.cpp/
SOURCE_FILE = "SOURCE.json"  # beside the converter: where it came from
CONVERT_TIMEOUT_S = 3600


def converter_path() -> Path:
    configured = os.environ.get(CONVERTER_ENV)
    return Path(configured) if configured else Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"


def file_name(quantization: str) -> str:
    return f"model.{quantization}.gguf"


def export(model_dir: Path, quantization: str) -> dict | None:
    """Write `model_dir`'s model (safetensors and tokenizer, as saved) as `model.<quantization>.gguf` in it; the
    manifest entry, or None when no GGUF was written (the log says why)."""
    if quantization == "none":
        return None
    converter = converter_path()
    if not converter.is_file():
        log.warning(
            "gguf: no llama.cpp converter at %s (docker/install_gguf_converter.py installs it; %s names another):"
            " the artifact has safetensors only",
            converter,
            CONVERTER_ENV,
        )
        return None
    target = model_dir / file_name(quantization)
    converted = target if quantization == "q8_0" else model_dir / ".model.f16.gguf"
    outtype = "q8_0" if quantization == "q8_0" else "f16"
    try:
        if not _convert(converter, model_dir, converted, outtype):
            return None
        if converted != target and not _quantize(converted, target, quantization):
            return None
    finally:
        if converted != target:
            converted.unlink(missing_ok=True)
    entry = {
        "file": target.name,
        "quantization": quantization,
        "sha256": file_sha256(target),
        "bytes": target.stat().st_size,
        "converter": _source(converter),
    }
    log.info("gguf: %s written (%.1f MB, %s)", target.name, entry["bytes"] / 1e6, quantization)
    return entry


def _convert(converter: Path, model_dir: Path, out: Path, outtype: str) -> bool:
    log.info("gguf: converting with %s (--outtype %s)", converter, outtype)
    try:
        result = subprocess.run(
            [sys.executable, str(converter), str(model_dir), "--outfile", str(out), "--outtype", outtype],
            capture_output=True,
            text=True,
            timeout=CONVERT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("gguf: the converter ran past %d s; the artifact has safetensors only", CONVERT_TIMEOUT_S)
        out.unlink(missing_ok=True)
        return False
    if result.returncode != 0:
        out.unlink(missing_ok=True)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "not supported" in line.lower()), None)
        reason = reason or (lines[-1] if lines else f"exit status {result.returncode}")
        log.warning(
            "gguf: llama.cpp's converter could not convert this model (%s); the artifact has safetensors only",
            reason.strip()[:300],
        )
        log.debug("gguf: converter output:\n%s", result.stderr[-4000:])
        return False
    return True


def _quantize(source: Path, target: Path, quantization: str) -> bool:
    try:
        import llama_cpp
    except ImportError:
        log.warning(
            "gguf: %s needs llama.cpp's quantizer (llama-cpp-python), which is not installed here; use q8_0, or "
            "install llama-cpp-python. The artifact has safetensors only",
            quantization,
        )
        return False
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_FTYPES[quantization])
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        target.unlink(missing_ok=True)
        log.warning("gguf: llama.cpp's quantizer failed (status %d); the artifact has safetensors only", status)
        return False
    return True


def _source(converter: Path) -> dict:
    try:
        return json.loads((converter.parent / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {"path": str(converter)}
