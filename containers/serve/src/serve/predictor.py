"""Loading the training image's artifact and turning requests into engine work.

The artifact is a Transformers directory (merged safetensors weights, tokenizer with the training prompt
format as its chat template, generation_config.json) or a LoRA adapter (adapter_config.json +
adapter_model.safetensors) on top of a base model, merged at load. Pickle weights are refused.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.config import ServeConfig
from serve.engine import Engine, GenerationHandle, SamplingParams

log = logging.getLogger("serve.predictor")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Used when neither the model config nor the tokenizer states a usable context length.
FALLBACK_CONTEXT_LENGTH = 2048


class ArtifactError(Exception):
    """The model directory is missing, unsafe or unreadable."""


class PromptError(ValueError):
    """The request's prompt cannot be served (too long, no chat template); the message names the field."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    eos_token_ids: list[int]
    context_length: int
    name: str


def load_artifact(model_dir: Path, config: ServeConfig) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"model directory {model_dir} does not exist (set SAGEMAKER_BASE_DIR?)")
    _refuse_pickles(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _dtype(config.dtype, device)
    if device == "cuda":
        # cuDNN's attention backend builds an execution plan per new shape (hundreds of ms each, see
        # pytorch/pytorch#155958); a decode's KV length changes every step. Flash / mem-efficient don't.
        torch.backends.cuda.enable_cudnn_sdp(False)
    trust = config.trust_remote_code
    adapter_config = model_dir / "adapter_config.json"
    if adapter_config.exists() and not (model_dir / "config.json").exists():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ArtifactError(f"{adapter_config} has no base_model_name_or_path")
        if not (model_dir / "adapter_model.safetensors").exists():
            raise ArtifactError(f"{model_dir} has no adapter_model.safetensors (only safetensors are loaded)")
        if Path(base).is_dir():
            _refuse_pickles(Path(base))
        log.info("loading base model %s and merging the LoRA adapter in %s", base, model_dir)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True, trust_remote_code=trust)
        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
        tokenizer_source = model_dir if _has_tokenizer(model_dir) else base
        name = str(base)
    else:
        if not (model_dir / "config.json").exists():
            raise ArtifactError(f"{model_dir} has neither config.json (a model) nor adapter_config.json (LoRA)")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=trust
        )
        tokenizer_source = model_dir
        name = _manifest_name(model_dir)
    model.to(device).eval()
    if device == "cpu":
        _choose_cpu_matmul(model, config.cpu_matmul)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust)
    return LoadedModel(model, tokenizer, _eos_ids(model, tokenizer), _context_length(model, tokenizer, config), name)


def _choose_cpu_matmul(model: Any, setting: str) -> None:
    """`auto`/`packed`: oneDNN-packed fp32 linears (much faster batched steps, see serve.cpu_kernels)."""
    import torch

    from serve import cpu_kernels

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
    log.info("packed %d linear layers for oneDNN (SERVE_CPU_MATMUL=%s); batches of %d+ rows use them",
             count, setting, cpu_kernels.DEFAULT_MIN_ROWS)


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any(p.suffix == ".safetensors" for p in directory.iterdir()):
        raise ArtifactError(
            f"{directory} holds only pickle weights {pickles}; this server loads safetensors "
            "only (pickles can run code on load). Re-save with save_pretrained(safe_serialization"
            "=True)."
        )


def _dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").exists() or (directory / "tokenizer_config.json").exists()


def _manifest_name(model_dir: Path) -> str:
    try:  # informational only: name the fine-tuned model after its base when the manifest says so
        manifest = json.loads((model_dir / "manifest.json").read_text())
        return f"{manifest['base_model']} ({manifest.get('method', 'fine-tuned')})"
    except (OSError, ValueError, KeyError, TypeError):
        return model_dir.resolve().name


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Stop on any end token the artifact names: generation_config eos (may be a list), tokenizer eos."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _context_length(model: Any, tokenizer: Any, config: ServeConfig) -> int:
    if config.max_input_tokens:
        return config.max_input_tokens
    text_config = model.config.get_text_config()
    for value in (getattr(text_config, "max_position_embeddings", None), tokenizer.model_max_length):
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
    return FALLBACK_CONTEXT_LENGTH


class Predictor:
    """The model in this worker: loads in the background, then prepares prompts and submits them.

    States: `loading` -> `ready`, or `failed` (with the reason, logged once; /ping stays 503).
    """

    def __init__(self, config: ServeConfig, loader: Callable[[Path, ServeConfig], LoadedModel] = load_artifact):
        self.config = config
        self._loader = loader
        self.state = "loading"
        self.reason: str | None = None
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.model_name = config.model_dir.resolve().name

    # ----- lifecycle -----

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="serve-loader", daemon=True).start()

    def load_now(self) -> None:
        self._load()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            if self.config.load_delay_s:
                time.sleep(self.config.load_delay_s)
            self._set_torch_threads()
            loaded = self._loader(self.config.model_dir, self.config)
            engine = Engine(
                loaded.model,
                loaded.tokenizer,
                eos_token_ids=loaded.eos_token_ids,
                context_length=loaded.context_length,
                max_batch_size=self.config.max_batch_size,
                max_queue=self.config.max_queue,
            )
            engine.start()
            self.loaded, self.engine, self.model_name = loaded, engine, loaded.name
            # Ready means a generation works, not just that weights are in memory.
            probe = self.encode_raw("Hello")
            engine.submit(probe, SamplingParams(max_new_tokens=2), deadline=time.monotonic() + 300).result(300)
        except Exception as e:
            self.state, self.reason = "failed", f"{type(e).__name__}: {e}"
            log.error(
                "model load failed; /ping will answer 503: %s",
                self.reason,
                exc_info=not isinstance(e, ArtifactError),
            )
            return
        self.state = "ready"
        log.info(
            "model %s ready in %.1f s (context %d tokens, eos %s)",
            self.model_name,
            time.monotonic() - started,
            loaded.context_length,
            loaded.eos_token_ids,
        )

    def _set_torch_threads(self) -> None:
        import os

        import torch

        # Each worker gets its share of the cores; oversubscribing makes every step slower.
        threads = self.config.torch_threads or max(1, (os.cpu_count() or 1) // self.config.workers)
        torch.set_num_threads(threads)

    def shutdown(self, drain_s: float) -> None:
        if self.engine is not None:
            self.engine.cap_deadlines(time.monotonic() + drain_s)

    # ----- requests -----

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def context_length(self) -> int:
        assert self.loaded is not None
        return self.loaded.context_length

    def encode_raw(self, text: str) -> list[int]:
        assert self.loaded is not None
        return list(self.loaded.tokenizer(text).input_ids)

    def encode_chat(self, messages: Sequence[dict[str, str]], *, field: str) -> list[int]:
        """The artifact's prompt format (its chat template) around `messages`, ready for the answer."""
        assert self.loaded is not None
        tokenizer = self.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError(
                f"{field}: this model has no chat template; send raw text with "
                "`inputs` and parameters.apply_chat_template=false"
            )
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    def encode_question(self, question: str, *, apply_chat_template: bool) -> list[int]:
        assert self.loaded is not None
        if apply_chat_template and getattr(self.loaded.tokenizer, "chat_template", None):
            return self.encode_chat([{"role": "user", "content": question}], field="inputs")
        return self.encode_raw(question)

    def fit_context(self, prompt_ids: list[int], *, truncate: int | None, field: str) -> list[int]:
        """Keep the prompt within the context (one token at least left to generate), or explain why not."""
        limit = self.context_length - 1
        if truncate is not None:
            prompt_ids = prompt_ids[-min(truncate, limit) :]
        if len(prompt_ids) > limit:
            raise PromptError(
                f"{field}: the prompt is {len(prompt_ids)} tokens but the model's context is "
                f"{self.context_length} tokens; shorten it or set parameters.truncate"
            )
        return prompt_ids

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationHandle:
        assert self.engine is not None
        deadline = time.monotonic() + self.config.generation_budget_s
        return self.engine.submit(prompt_ids, params, deadline=deadline)
