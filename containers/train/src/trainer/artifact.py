"""The servable artifact: merged weights (safetensors), tokenizer with the training prompt format as its chat
template, generation config, the retrieval index when the job trained with one (`retrieval/`, trainer.retrieval),
the same model as GGUF for llama.cpp unless `gguf_quantization` is none (trainer.gguf_export; manifest.json's
`gguf` names it), and manifest.json, which records the sha256 of every weight file
(`"weights_sha256": {"model.safetensors": "<hex>", ...}`) for the server to check before it loads them.

Files are written into a staging folder inside the model directory and moved up one by one, the manifest
last: a model directory with a manifest is complete, one without is not (a full disk or a kill mid-save
never leaves something that looks finished).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MANIFEST = "manifest.json"


def merge_for_serving(model):
    """LoRA adapters folded into the base weights; a fully fine-tuned model is returned as is."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save_artifact(
    model,
    tokenizer,
    stop_token_ids,
    model_dir: Path,
    manifest: dict,
    stop_strings=(),
    retrieval_index=None,
    gguf_quantization: str = "none",
) -> Path:
    from transformers import GenerationConfig

    from . import gguf_export
    from .retrieval import RETRIEVAL_DIR

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    (model_dir / MANIFEST).unlink(missing_ok=True)

    # Defaults a server reads: stop on the format's end markers, pad distinct from EOS, deterministic.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=list(stop_token_ids),
        stop_strings=list(stop_strings) or None,  # servers cut the answer there (serve reads it)
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(model_dir / RETRIEVAL_DIR, ignore_errors=True)  # an earlier run's index is not this model's
    if retrieval_index is not None:
        retrieval_index.save(staging / RETRIEVAL_DIR)
    for stale in model_dir.glob("*.gguf"):  # an earlier run's GGUF is not this model's either
        stale.unlink()
    gguf = gguf_export.export(staging, gguf_quantization)
    manifest = {**manifest, "weights_sha256": {p.name: file_sha256(p) for p in sorted(staging.glob("*.safetensors"))}}
    if gguf is not None:
        manifest["gguf"] = gguf
    for path in sorted(staging.iterdir()):
        # safetensors writes 0600; a serving container that runs as non-root must still read the weights.
        _readable(path)
        os.replace(path, model_dir / path.name)
    staging.rmdir()
    _write_manifest(model_dir, manifest)
    return model_dir


def read_manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))


def update_manifest(model_dir: Path, changes: dict) -> dict:
    """The artifact's manifest.json with `changes` merged in (e.g. metrics measured on the written artifact),
    replaced atomically; returns it."""
    manifest = read_manifest(model_dir) | changes
    _write_manifest(model_dir, manifest)
    return manifest


def _write_manifest(model_dir: Path, manifest: dict) -> None:
    """Written last and atomically: a model directory without manifest.json is incomplete."""
    tmp = model_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.chmod(0o644)
    os.replace(tmp, model_dir / MANIFEST)


def _readable(path: Path) -> None:
    """Readable by everyone: files 0644, folders (the retrieval index) 0755, all the way down."""
    if path.is_dir():
        path.chmod(0o755)
        for child in path.iterdir():
            _readable(child)
    else:
        path.chmod(0o644)


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
