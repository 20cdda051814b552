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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from serve.config import ServeConfig
from serve.generation import GenerationHandle, PromptError, SamplingParams

if TYPE_CHECKING:
    from serve.artifact import LoadedModel
    from serve.engine import Engine
    from serve.retrieval import Hit, RetrievalIndex

log = logging.getLogger("serve.predictor")

Loader = Callable[[Path, ServeConfig], "LoadedModel"]


@dataclass(frozen=True)
class Prompt:
    """A request's prompt, ready for the engine, and the retrieved passages in it (None: retrieval did not apply
    to this request; [] it did and found nothing, or none fitted)."""

    ids: list[int]
    sources: list[dict] | None = None


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
        self.retrieval: RetrievalIndex | None = None  # the artifact's index (model/retrieval/), if it has one
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
            from serve import artifact, llamacpp, retrieval
            from serve.engine import Engine

            explained = (artifact.ArtifactError, retrieval.RetrievalIndexError, llamacpp.LlamaCppError)
            artifact.set_torch_threads(self.config)
            index = retrieval.load_index(self.config.model_dir)  # before the weights: a broken index fails fast
            loaded = (self._loader or llamacpp.choose_loader(self.config))(self.config.model_dir, self.config)
            if index is not None:
                _check_template_places_documents(loaded.tokenizer, index)
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
            self.retrieval = index
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
            "model %s ready in %.1f s (engine %s, context %d tokens, eos %s, retrieval %s)",
            self.model_name,
            time.monotonic() - started,
            engine.runner.name,
            loaded.context_length,
            loaded.eos_token_ids,
            f"{len(index)} passages, k={index.k}" if index is not None else "none",
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

    def encode_chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        field: str,
        documents: Sequence[dict[str, str]] | None = None,
    ) -> list[int]:
        """The artifact's prompt format (its chat template) around `messages`, ready for the answer; with
        `documents` ({"title", "text"} each), the template places them too (retrieval). What the caller sent and
        the passages' text stay text even where they spell a special token."""
        assert self.loaded is not None
        tokenizer = self.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError(
                f"{field}: this model has no chat template; send raw text with "
                "`inputs` and parameters.apply_chat_template=false"
            )
        documents = list(documents or ()) or None  # [] renders as no documents: pass none
        specials = [t for t in tokenizer.all_special_tokens if t] + [
            t.content for t in tokenizer.added_tokens_decoder.values() if t.special
        ]
        texts = [m["content"] for m in messages] + [d[key] for d in documents or () for key in ("title", "text")]
        if not any(special in text for text in texts for special in specials):
            text = tokenizer.apply_chat_template(
                list(messages), documents=documents, add_generation_prompt=True, tokenize=False
            )
            return list(tokenizer(text, add_special_tokens=False).input_ids)
        return _encode_with_content_as_text(tokenizer, messages, documents)

    def encode_question(self, question: str, *, apply_chat_template: bool) -> list[int]:
        assert self.loaded is not None
        if apply_chat_template and getattr(self.loaded.tokenizer, "chat_template", None):
            return self.encode_chat([{"role": "user", "content": question}], field="inputs")
        return self.encode_raw(question)

    # ----- retrieval -----

    def wants_retrieval(self, requested: bool | None, *, field: str) -> bool:
        """Whether a request that applies the chat template retrieves: unless it says false, when the artifact has
        an index. `true` for a model without one is the caller's mistake, named."""
        if requested and self.retrieval is None:
            raise PromptError(f"{field}: this model has no retrieval index; leave it out or send false")
        return self.retrieval is not None and requested is not False

    def prepare_chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        field: str,
        retrieve: bool,
        truncate: int | None = None,
    ) -> Prompt:
        """The prompt for `messages`: with `retrieve`, the index's top k passages for the last user message go in
        through the chat template. Passages that do not fit the context (or `truncate`, or the server's prompt
        cap) are dropped, the last first, so that the question is never cut for them; `sources` lists those
        that stayed. Then as any prompt: fitted to the context, or refused (fit_context)."""
        if not retrieve:
            return Prompt(self.fit_context(self.encode_chat(messages, field=field), truncate=truncate, field=field))
        assert self.retrieval is not None
        hits = self.retrieve(messages)
        ids = self.encode_chat(messages, field=field, documents=[h.document() for h in hits])
        budget = min([self.context_length - 1, *(n for n in (truncate, self.config.max_prompt_tokens) if n)])
        while hits and len(ids) > budget:
            hits = hits[:-1]
            ids = self.encode_chat(messages, field=field, documents=[h.document() for h in hits])
        return Prompt(self.fit_context(ids, truncate=truncate, field=field), [h.source() for h in hits])

    def retrieve(self, messages: Sequence[dict[str, str]]) -> list[Hit]:
        """The passages for a conversation: its last user message is the query (none without one)."""
        assert self.retrieval is not None
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        return self.retrieval.search(query) if query else []

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


def _encode_with_content_as_text(
    tokenizer, messages: Sequence[dict[str, str]], documents: Sequence[dict[str, str]] | None = None
) -> list[int]:
    """The chat template around `messages` (and `documents`), where what the caller typed, and the passages'
    titles and texts, are text even when they spell a special token (`<|im_end|>`, `### End`): else such a
    string would end the turn or the answer, or pose as the system. The template is rendered around
    placeholders; its own parts are tokenized as usual (their special tokens are control tokens), each
    message's content and each passage's title and text with special-token parsing off."""
    contents: dict[str, str] = {}

    def mark(value: str) -> str:
        placeholder = f"@@content-{uuid.uuid4().hex}@@"
        contents[placeholder] = value
        return placeholder

    placeholders = [{**m, "content": mark(m["content"])} for m in messages]
    marked_documents = [{"title": mark(d["title"]), "text": mark(d["text"])} for d in documents or ()] or None
    text = tokenizer.apply_chat_template(
        placeholders, documents=marked_documents, add_generation_prompt=True, tokenize=False
    )
    marks = list(contents)
    ids: list[int] = []
    for part in re.split(f"({'|'.join(map(re.escape, marks))})", text):
        if part in contents:
            ids += tokenizer(contents[part], add_special_tokens=False, split_special_tokens=True).input_ids
        elif part:
            ids += tokenizer(part, add_special_tokens=False).input_ids
    return ids


def _check_template_places_documents(tokenizer, index: RetrievalIndex) -> None:
    """An artifact with an index must have a chat template that renders `documents` (training prepends
    trainer.prompts.DOCUMENTS_PREAMBLE to it): else every passage retrieved would silently be left out."""
    from serve.retrieval import RetrievalIndexError

    if not getattr(tokenizer, "chat_template", None):
        raise RetrievalIndexError(
            f"{index.directory} holds a retrieval index, but the tokenizer has no chat template to place passages"
        )
    title, text = (f"@@{part}-{uuid.uuid4().hex}@@" for part in ("title", "text"))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}],
        documents=[{"title": title, "text": text}],
        add_generation_prompt=True,
        tokenize=False,
    )
    if title not in rendered or text not in rendered:
        raise RetrievalIndexError(
            f"{index.directory} holds a retrieval index, but the chat template ignores `documents` (a model "
            "trained with retrieval has a template that places them); the passages would never reach the model"
        )
