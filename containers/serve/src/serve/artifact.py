"""Loading the training image's artifact: the model, its tokenizer and what serving needs to know about them.

The artifact is a Transformers directory (merged safetensors weights, tokenizer with the training prompt
format as its chat template, generation_config.json) or a LoRA adapter (adapter_config.json +
adapter_model.safetensors) on top of a base model, merged at load. Pickle weights are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve import cpu_kernels
from serve.config import ServeConfig

log = logging.getLogger("serve.artifact")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Used when neither the model config nor the tokenizer states a usable context length.
FALLBACK_CONTEXT_LENGTH = 2048
# Prompt plus answer, unless SERVE_MAX_INPUT_TOKENS says otherwise: TGI's default max_total_tokens. A longer
# context than this multiplies what one request may hold of the batch's memory and time.
DEFAULT_MAX_TOTAL_TOKENS = 4096
# Shares of the memory free after loading that the batch's KV cache may take (the rest: activations, fragments).
KV_SHARE_OF_FREE_GPU_MEMORY = 0.8
KV_SHARE_OF_AVAILABLE_HOST_MEMORY = 0.5


class ArtifactError(Exception):
    """The model directory is missing, unsafe or unreadable."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    eos_token_ids: list[int]
    context_length: int
    name: str
    # End markers the artifact's generation_config.json names as text (several tokens each): every answer ends
    # before them, as it ends at an end token.
    stop_strings: tuple[str, ...] = ()
    # The batch's KV cache in tokens (rows x longest row); None: the engine's own bound (batch size x context).
    max_batch_total_tokens: int | None = None


def load_artifact(model_dir: Path, config: ServeConfig) -> LoadedModel:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"model directory {model_dir} does not exist (set SAGEMAKER_BASE_DIR?)")
    _refuse_pickles(model_dir)
    verify_weights(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _dtype(config.dtype, device, model_dir)
    if device == "cuda":
        # cuDNN's attention backend builds an execution plan per new shape (hundreds of ms each, see
        # pytorch/pytorch#155958); a decode's KV length changes every step. Flash / mem-efficient don't.
        torch.backends.cuda.enable_cudnn_sdp(False)
    trust = config.trust_remote_code
    # SERVE_GPU_PLACEMENT=device_map (gunicorn.conf.py resolves `auto`): layers spread over every visible GPU.
    device_map = "auto" if device == "cuda" and config.gpu_placement == "device_map" else None
    adapter_config = model_dir / "adapter_config.json"
    if adapter_config.exists() and not (model_dir / "config.json").exists():
        from peft import PeftModel  # only adapter artifacts need it, and it takes seconds to import

        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ArtifactError(f"{adapter_config} has no base_model_name_or_path")
        if not (model_dir / "adapter_model.safetensors").exists():
            raise ArtifactError(f"{model_dir} has no adapter_model.safetensors (only safetensors are loaded)")
        if Path(base).is_dir():
            _refuse_pickles(Path(base))
        log.info("loading base model %s and merging the LoRA adapter in %s", base, model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype, use_safetensors=True, trust_remote_code=trust, device_map=device_map
        )
        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
        tokenizer_source = model_dir if _has_tokenizer(model_dir) else base
        name = str(base)
    else:
        if not (model_dir / "config.json").exists():
            raise ArtifactError(f"{model_dir} has neither config.json (a model) nor adapter_config.json (LoRA)")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=trust, device_map=device_map
        )
        tokenizer_source = model_dir
        name = manifest_name(model_dir)
    if device_map is None:
        model.to(device)
    model.eval()
    if device == "cpu":
        _choose_cpu_matmul(model, config.cpu_matmul)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust)
    stop_strings = getattr(getattr(model, "generation_config", None), "stop_strings", None) or ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    context_length_ = context_length(model.config, tokenizer, config)
    return LoadedModel(
        model,
        tokenizer,
        end_token_ids(getattr(model, "generation_config", None), model.config, tokenizer),
        context_length_,
        name,
        tuple(stop_strings),
        batch_token_budget(model, config, context_length_),
    )


def _choose_cpu_matmul(model: Any, setting: str) -> None:
    """`auto`/`packed`: oneDNN-packed fp32 linears (much faster batched steps, see serve.cpu_kernels)."""
    if setting == "stock":
        return
    onednn = cpu_kernels.available()
    if model.dtype != torch.float32 or not onednn:
        if setting == "packed":
            raise ArtifactError(
                f"SERVE_CPU_MATMUL=packed needs an fp32 model and a PyTorch built with oneDNN (model dtype "
                f"{model.dtype}, oneDNN available: {onednn}); use auto or stock"
            )
        return
    count = cpu_kernels.pack_linears(model)
    log.info(
        "packed %d linear layers for oneDNN (SERVE_CPU_MATMUL=%s); batches of %d+ rows use them",
        count,
        setting,
        cpu_kernels.DEFAULT_MIN_ROWS,
    )


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any(p.suffix == ".safetensors" for p in directory.iterdir()):
        raise ArtifactError(
            f"{directory} holds only pickle weights {pickles}; this server loads safetensors "
            "only (pickles can run code on load). Re-save with save_pretrained(safe_serialization"
            "=True)."
        )


def _dtype(name: str, device: str, model_dir: Path) -> Any:
    """SERVE_DTYPE, or `auto`: on a GPU a 16-bit artifact in its own type (never upcast) and an fp32 one in bf16,
    the GPU's fast path; on a CPU fp32, whose kernels there are the fast and exact ones."""
    if name != "auto":
        return getattr(torch, name)
    if device != "cuda":
        return torch.float32
    stored = artifact_dtype(model_dir)
    return getattr(torch, stored) if stored != "float32" else torch.bfloat16


def artifact_dtype(model_dir: Path) -> str:
    """The floating type the artifact was saved in: manifest.json's `dtype`, else config.json's, else float32."""
    for name, keys in (("manifest.json", ("dtype",)), ("config.json", ("dtype", "torch_dtype"))):
        try:
            content = json.loads((model_dir / name).read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            value = content.get(key) if isinstance(content, dict) else None
            if value in ("float32", "bfloat16", "float16"):
                return value
    return "float32"


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").exists() or (directory / "tokenizer_config.json").exists()


def manifest_name(model_dir: Path) -> str:
    try:  # informational only: name the fine-tuned model after its base when the manifest says so
        manifest = json.loads((model_dir / "manifest.json").read_text())
        return f"{manifest['base_model']} ({manifest.get('method', 'fine-tuned')})"
    except (OSError, ValueError, KeyError, TypeError):
        return model_dir.resolve().name


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_weights(model_dir: Path) -> None:
    """Weights are what training wrote: when manifest.json lists `weights_sha256`, every safetensors file in the
    directory must be listed there and hash to it. An artifact without the list (older, or not ours) loads as
    before; the log says so."""
    manifest_path = model_dir / "manifest.json"
    try:
        expected = json.loads(manifest_path.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        log.info("%s lists no weight hashes: weights loaded unverified", model_dir)
        return
    if not isinstance(expected, dict):
        raise ArtifactError(f"{manifest_path}: weights_sha256 is not a mapping of file names to hashes")
    present = sorted(p.name for p in model_dir.glob("*.safetensors"))
    unlisted = [name for name in present if name not in expected]
    missing = [name for name in expected if name not in present]
    if unlisted or missing:
        raise ArtifactError(
            f"{model_dir}: weight files differ from manifest.json's weights_sha256 "
            f"(not listed: {unlisted or 'none'}; listed but absent: {missing or 'none'})"
        )
    for name in present:
        if file_sha256(model_dir / name) != expected[name]:
            raise ArtifactError(f"{model_dir / name}: sha256 differs from manifest.json's; the weights were changed")
    log.info("weights verified against manifest.json: %s", ", ".join(present))


def end_token_ids(generation_config: Any, model_config: Any, tokenizer: Any) -> list[int]:
    """Stop on any end token the artifact names: generation_config eos (may be a list), tokenizer eos."""
    ids: set[int] = set()
    for source in (generation_config, model_config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def context_length(model_config: Any, tokenizer: Any, config: ServeConfig) -> int:
    if config.max_input_tokens:
        return config.max_input_tokens
    text_config = model_config.get_text_config()
    for value in (getattr(text_config, "max_position_embeddings", None), tokenizer.model_max_length):
        if isinstance(value, int) and 0 < value < 1_000_000:
            return min(value, DEFAULT_MAX_TOTAL_TOKENS)
    return FALLBACK_CONTEXT_LENGTH


def batch_token_budget(model: Any, config: ServeConfig, context_length: int) -> int:
    """How many tokens the running batch's KV cache may hold (TGI's max_batch_total_tokens): as set, or sized
    from the memory free once the weights are in (GPU) or available to this worker (CPU). Never less than one
    request at full context, never more than a full batch of them."""
    if config.max_batch_total_tokens:
        return config.max_batch_total_tokens
    per_token = kv_bytes_per_token(model)
    if next(model.parameters()).is_cuda:
        free, _total = torch.cuda.mem_get_info()
        room = free * KV_SHARE_OF_FREE_GPU_MEMORY
    else:
        room = _available_host_memory() / max(config.workers, 1) * KV_SHARE_OF_AVAILABLE_HOST_MEMORY
    budget = max(context_length, min(int(room // per_token), config.max_batch_size * context_length))
    log.info(
        "KV cache budget: %d tokens (%.0f KiB each; %.1f GiB), %d full-context requests at once",
        budget,
        per_token / 1024,
        budget * per_token / 2**30,
        budget // context_length,
    )
    return budget


def kv_bytes_per_token(model: Any) -> int:
    """Keys and values of one token across every layer, in the model's floating type."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = next(model.parameters()).element_size()
    return 2 * text.num_hidden_layers * kv_heads * head_dim * element


def _available_host_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def set_torch_threads(config: ServeConfig) -> None:
    # Each worker gets its share of the cores; oversubscribing makes every step slower.
    threads = config.torch_threads or max(1, (os.cpu_count() or 1) // config.workers)
    torch.set_num_threads(threads)
