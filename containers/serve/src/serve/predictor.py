"""The model in this worker: loaded in the background, then turning prompts into engine work.

This module does not import torch: `create_app` builds a Predictor before any model code is loaded, and
importing torch and transformers takes seconds, which the loader thread spends while /ping answers 503.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from serve.config import ServeConfig
from serve.generation import GenerationHandle, PromptError, SamplingParams

if TYPE_CHECKING:
    from serve.artifact import LoadedModel
    from serve.engine import Engine

log = logging.getLogger("serve.predictor")

Loader = Callable[[Path, ServeConfig], "LoadedModel"]


class Predictor:
    """The model in this worker: loads in the background, then prepares prompts and submits them.

    States: `loading` -> `ready`, or `failed` (with the reason, logged once; /ping stays 503).
    """

    def __init__(self, config: ServeConfig, loader: Loader | None = None):
        """`loader` (tests) replaces serve.artifact.load_artifact."""
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
        explained: tuple[type[Exception], ...] = ()  # failures whose message says it all: no traceback
        try:
            if self.config.load_delay_s:
                time.sleep(self.config.load_delay_s)
            # Here, on the loader thread: these import torch and transformers (see the module docstring).
            from serve import artifact
            from serve.engine import Engine

            explained = (artifact.ArtifactError,)
            artifact.set_torch_threads(self.config)
            loaded = (self._loader or artifact.load_artifact)(self.config.model_dir, self.config)
            engine = Engine(
                loaded.model,
                loaded.tokenizer,
                eos_token_ids=loaded.eos_token_ids,
                context_length=loaded.context_length,
                max_batch_size=self.config.max_batch_size,
                max_queue=self.config.max_queue,
                max_batch_total_tokens=loaded.max_batch_total_tokens,
            )
            engine.start()
            self.loaded, self.engine, self.model_name = loaded, engine, loaded.name
            # Ready means a generation works, not just that weights are in memory. A prompt of some length, so
            # that the engine knows its prefill rate from the start (it refuses work it cannot start in time).
            probe = self.encode_raw("Hello, " * 32)
            engine.submit(probe, SamplingParams(max_new_tokens=2), deadline=time.monotonic() + 300).result(300)
        except Exception as e:
            self.state, self.reason = "failed", f"{type(e).__name__}: {e}"
            log.error(
                "model load failed; /ping will answer 503: %s",
                self.reason,
                exc_info=not isinstance(e, explained),
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

    def shutdown(self, drain_s: float) -> None:
        if self.engine is not None:
            self.engine.cap_deadlines(time.monotonic() + drain_s)

    # ----- requests -----

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def health(self) -> str | None:
        """None when this worker serves; else why not: still loading, failed to load, or its engine broke."""
        if self.state == "loading":
            return "the model is loading"
        if self.state == "failed":
            return f"the model failed to load: {self.reason}"
        assert self.engine is not None
        return self.engine.health()

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
        specials = [t for t in tokenizer.all_special_tokens if t] + [
            t.content for t in tokenizer.added_tokens_decoder.values() if t.special
        ]
        if not any(special in m["content"] for m in messages for special in specials):
            text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            return list(tokenizer(text, add_special_tokens=False).input_ids)
        return _encode_with_content_as_text(tokenizer, messages)

    def encode_question(self, question: str, *, apply_chat_template: bool) -> list[int]:
        assert self.loaded is not None
        if apply_chat_template and getattr(self.loaded.tokenizer, "chat_template", None):
            return self.encode_chat([{"role": "user", "content": question}], field="inputs")
        return self.encode_raw(question)

    def fit_context(self, prompt_ids: list[int], *, truncate: int | None, field: str) -> list[int]:
        """Keep the prompt within the context (one token at least left to generate) and the server's prompt cap,
        or explain why not."""
        limit = self.context_length - 1
        cap = self.config.max_prompt_tokens
        if truncate is not None:
            prompt_ids = prompt_ids[-min(truncate, limit, cap or limit) :]
        if cap is not None and len(prompt_ids) > cap:
            raise PromptError(
                f"{field}: the prompt is {len(prompt_ids)} tokens, more than this server's cap of {cap} "
                f"({self.config.env_name('max_prompt_tokens')}); shorten it or set parameters.truncate"
            )
        if len(prompt_ids) > limit:
            raise PromptError(
                f"{field}: the prompt is {len(prompt_ids)} tokens but the model's context is "
                f"{self.context_length} tokens; shorten it or set parameters.truncate"
            )
        return prompt_ids

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationHandle:
        assert self.engine is not None and self.loaded is not None
        deadline = time.monotonic() + self.config.generation_budget_s
        if self.loaded.stop_strings:  # the artifact's own end markers end every answer, after the request's
            params = replace(params, stop=tuple(dict.fromkeys((*params.stop, *self.loaded.stop_strings))))
        return self.engine.submit(prompt_ids, params, deadline=deadline)


def _encode_with_content_as_text(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The chat template around `messages`, where what the caller typed is text even when it spells a special
    token (`<|im_end|>`, `### End`): typed, such a string would otherwise end the turn or the answer, or pose as
    the system. The template is rendered around placeholders; its own parts are tokenized as usual (their
    special tokens are control tokens), each message's content with special-token parsing off."""
    marks = [f"@@content-{uuid.uuid4().hex}@@" for _ in messages]
    placeholders = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
    text = tokenizer.apply_chat_template(placeholders, add_generation_prompt=True, tokenize=False)
    contents = {mark: m["content"] for m, mark in zip(messages, marks, strict=True)}
    ids: list[int] = []
    for part in re.split(f"({'|'.join(map(re.escape, marks))})", text):
        if part in contents:
            ids += tokenizer(contents[part], add_special_tokens=False, split_special_tokens=True).input_ids
        elif part:
            ids += tokenizer(part, add_special_tokens=False).input_ids
    return ids
