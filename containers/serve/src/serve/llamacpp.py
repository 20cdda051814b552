"""llama.cpp as the engine's model on a CPU: the artifact's GGUF, read through llama-cpp-python's C API.

Only the model step moves to llama.cpp. Scheduling, token choice (seeds, temperature, top-p/k, typical-p,
repetition penalty, top-n tokens), stop sequences, text and streaming stay in serve.engine, so every request shape
and reply is the same on either engine. The running sequences share one llama.cpp context: each holds a sequence
id (a slot) in its unified KV cache, a prefill puts several prompts in one `llama_decode`, and each decode step
feeds every running sequence's last token in one more (continuous batching, as llama.cpp's own server does it
with parallel slots).

Why the C API rather than llama-cpp-python's `Llama` class: that class runs one sequence at a time and samples
in C; here the engine needs logits rows for many sequences at once, to choose tokens exactly as it does on the
transformers engine.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve import engine_choice
from serve.config import ServeConfig
from serve.engine_choice import GgufEntry
from serve.runners import ModelRunner, PrefillCost, Prefilled

log = logging.getLogger("serve.llamacpp")

# Tokens one llama_decode call takes at most (llama.cpp's n_batch); a longer prefill is split across calls.
DECODE_CALL_TOKENS = 2048
# The KV cache llama.cpp allocates up front, in tokens shared by every running sequence, unless
# SERVE_MAX_BATCH_TOTAL_TOKENS says otherwise: llama.cpp reserves all of it at start, where the transformers
# engine's cache grows with the batch.
DEFAULT_KV_TOKENS = 32768


class LlamaCppError(RuntimeError):
    """llama.cpp could not load the GGUF, or refused a batch."""


class OutOfKVCache(LlamaCppError):
    """llama_decode found no room in the KV cache (the engine retires the newest sequence, as for OOM)."""

    def __str__(self) -> str:
        return f"out of memory: {super().__str__()}"


def verify_gguf(entry: GgufEntry) -> None:
    from serve.artifact import ArtifactError, file_sha256

    if not entry.path.is_file():
        raise ArtifactError(f"manifest.json names the GGUF {entry.path.name}, which the artifact lacks")
    if entry.sha256 is None:
        return
    if file_sha256(entry.path) != entry.sha256:
        raise ArtifactError(f"{entry.path}: sha256 differs from manifest.json's; the GGUF was changed")


# ggml's log levels (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5: the rest of the last line).
_NATIVE_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_native_log = logging.getLogger("serve.llamacpp.native")
_native_callback = None  # kept referenced: llama.cpp calls it for as long as the process lives


def _route_native_logs(llama_cpp: Any) -> None:
    """llama.cpp's own log lines into Python logging: its load and context reports at DEBUG, warnings and errors
    as such. (llama-cpp-python's callback maps an older ggml level numbering, and printed every load step.)"""
    global _native_callback
    if _native_callback is not None:
        return
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: Any) -> None:
        if level != 5:
            last[0] = _NATIVE_LEVELS.get(level, logging.INFO)
        message = text.decode("utf-8", errors="replace").rstrip()
        if message and _native_log.isEnabledFor(last[0]):
            _native_log.log(last[0], "%s", message)

    _native_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class LlamaCppRunner(ModelRunner):
    """A GGUF model in one llama.cpp context; row i of the batch is the sequence in slot `self._rows[i]`."""

    name = "llamacpp"

    def __init__(self, gguf: Path, *, threads: int, max_sequences: int, kv_tokens: int) -> None:
        import llama_cpp

        _route_native_logs(llama_cpp)
        self._lib = llama_cpp
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), model_params)
        if not self._model:
            raise LlamaCppError(f"llama.cpp could not load {gguf}")
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = kv_tokens
        context_params.n_batch = DECODE_CALL_TOKENS
        context_params.n_ubatch = min(512, DECODE_CALL_TOKENS)
        context_params.n_seq_max = max_sequences
        context_params.n_threads = threads
        context_params.n_threads_batch = threads
        context_params.kv_unified = True  # one cache shared by the slots: a sequence may use what others don't
        context_params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, context_params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise LlamaCppError(f"llama.cpp could not create a context of {kv_tokens} tokens for {gguf}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self._batch = llama_cpp.llama_batch_init(DECODE_CALL_TOKENS, 0, 1)
        self.kv_tokens = llama_cpp.llama_n_ctx(self._ctx)
        self.max_sequences = max_sequences
        self._free_slots = list(range(max_sequences - 1, -1, -1))  # popped from the end: slot 0 first
        self._rows: list[int] = []
        self.device = torch.device("cpu")
        layers = llama_cpp.llama_model_n_layer(self._model)
        width = llama_cpp.llama_model_n_embd(self._model)
        weights = llama_cpp.llama_model_n_params(self._model) - self.vocab_size * width  # less the embeddings
        self.cost = PrefillCost(2.0 * weights, 2.0 * layers * width)

    # ----- ModelRunner -----

    def prefill(self, prompts: Sequence[Sequence[int]], every_position: bool = False) -> Prefilled:
        if len(prompts) > len(self._free_slots):
            raise LlamaCppError(f"{len(prompts)} prompts for {len(self._free_slots)} free sequence slots")
        slots = [self._free_slots.pop() for _ in prompts]
        tokens = []
        for index, (slot, prompt) in enumerate(zip(slots, prompts, strict=True)):
            for position, token in enumerate(prompt):
                wanted = position == len(prompt) - 1 or (every_position and index == 0)
                tokens.append((token, position, slot, wanted))
        try:
            logits = self._run(tokens)
        except Exception:
            for slot in slots:  # a failed call may leave part of a prompt behind
                self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._free_slots.extend(reversed(slots))
            raise
        self._rows.extend(slots)
        if every_position:
            first = logits[: len(prompts[0])]
            return Prefilled(torch.cat([first[-1:], logits[len(prompts[0]) :]]), first)
        return Prefilled(logits)

    def decode(self, last_tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        tokens = [(t, p, slot, True) for t, p, slot in zip(last_tokens, positions, self._rows, strict=True)]
        return self._run(tokens)

    def undo_step(self) -> None:
        """Nothing: a llama_decode that finds no room leaves the cache as it was (llama.h)."""

    def keep(self, rows: Sequence[int]) -> None:
        kept = [self._rows[i] for i in rows]
        for slot in set(self._rows) - set(kept):
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._free_slots.append(slot)
        self._rows = kept

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._memory, True)
        self._free_slots = list(range(self.max_sequences - 1, -1, -1))
        self._rows = []

    # ----- llama.cpp calls -----

    def _run(self, tokens: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """Decode (token, position, sequence, wants logits) in calls of at most DECODE_CALL_TOKENS; the wanted
        logits, in order, [wanted, vocab]."""
        rows = []
        for start in range(0, len(tokens), DECODE_CALL_TOKENS):
            rows.append(self._decode_call(tokens[start : start + DECODE_CALL_TOKENS]))
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def _decode_call(self, tokens: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        batch = self._batch
        batch.n_tokens = len(tokens)
        wanted = 0
        for i, (token, position, slot, logits) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = logits
            wanted += logits
        status = self._lib.llama_decode(self._ctx, batch)
        if status == 1:
            raise OutOfKVCache(f"llama.cpp's KV cache ({self.kv_tokens} tokens) has no room for {len(tokens)} more")
        if status != 0:
            raise LlamaCppError(f"llama_decode failed with status {status}")
        if not wanted:
            return torch.empty((0, self.vocab_size))
        pointer = self._lib.llama_get_logits(self._ctx)
        # A copy: llama.cpp reuses the buffer at the next call.
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(wanted, self.vocab_size)).copy())

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None


def choose_loader(config: ServeConfig) -> Callable[[Path, ServeConfig], Any]:
    """The loader of the engine SERVE_ENGINE names (serve.engine_choice decides; a GPU keeps transformers)."""
    from serve import artifact

    try:
        choice = engine_choice.choose(config.engine, config.model_dir, gpu=torch.cuda.is_available())
    except engine_choice.EngineUnavailable as e:
        raise artifact.ArtifactError(str(e)) from None
    log.info("engine: %s (%s)", choice.engine, choice.why)
    if choice.engine == "llamacpp":
        return partial(load_gguf_artifact, entry=choice.gguf)
    return artifact.load_artifact


def load_gguf_artifact(model_dir: Path, config: ServeConfig, entry: GgufEntry) -> Any:
    """The artifact served from its GGUF by llama.cpp: a LoadedModel whose `model` is a LlamaCppRunner, with the
    tokenizer, end tokens and context length read from the artifact as for the transformers engine (the GGUF
    holds the same vocabulary, converted from that tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from serve import artifact

    verify_gguf(entry)
    model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code)
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation_config = None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code)
    context_length = artifact.context_length(model_config, tokenizer, config)
    threads = config.torch_threads or max(1, (os.cpu_count() or 1) // config.workers)
    kv_tokens = config.max_batch_total_tokens or max(
        context_length, min(DEFAULT_KV_TOKENS, config.max_batch_size * context_length)
    )
    runner = LlamaCppRunner(entry.path, threads=threads, max_sequences=config.max_batch_size, kv_tokens=kv_tokens)
    stop_strings = getattr(generation_config, "stop_strings", None) or ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    log.info(
        "llama.cpp engine: %s (%s), %d threads, %d sequences, KV cache %d tokens",
        entry.path.name,
        entry.quantization or "unknown quantization",
        threads,
        config.max_batch_size,
        runner.kv_tokens,
    )
    return artifact.LoadedModel(
        runner,
        tokenizer,
        artifact.end_token_ids(generation_config, model_config, tokenizer),
        context_length,
        f"{artifact.manifest_name(model_dir)} [GGUF {entry.quantization}]",
        tuple(stop_strings),
        runner.kv_tokens,
    )
