"""What a generation is, as the HTTP side and the engine both see it: settings in, events out. No torch here.

A request thread submits a prompt with its SamplingParams and holds the GenerationHandle it gets back: a
queue of Token events ending in one Finished (or a failure, raised as GenerationError).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

# Finish reasons, as TGI names them (plus our own `timeout` and `cancelled`).
LENGTH, EOS, STOP, TIMEOUT, CANCELLED = "length", "eos_token", "stop_sequence", "timeout", "cancelled"


class QueueFull(Exception):
    """More requests than SERVE_MAX_QUEUE are waiting or running."""


class GenerationError(RuntimeError):
    """The engine could not finish this request (a failed forward pass, shutdown, a stall)."""


class QueueTimeout(GenerationError):
    """The request waited in the queue past its deadline and never started: nothing was generated."""


class EngineStopped(Exception):
    """The engine is shut down or crashed and takes no new requests."""


class PromptError(ValueError):
    """The request's prompt cannot be served (too long, no chat template); the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    typical_p: float = 1.0  # TGI's typical decoding (Meister et al.); 1.0 is off
    # Per generated token, the `top_n_tokens` most likely alternatives (TGI's top_n_tokens, OpenAI's
    # top_logprobs), and whether the prompt's own tokens are scored too (TGI's decoder_input_details).
    top_n_tokens: int = 0
    prefill_logprobs: bool = False

    @classmethod
    def build(
        cls,
        *,
        max_new_tokens: int,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        typical_p: float | None = None,
        top_n_tokens: int = 0,
        prefill_logprobs: bool = False,
    ) -> SamplingParams:
        """TGI's rule: sampling when asked, or when a sampling knob is set; temperature 0 means greedy."""
        if do_sample is None:
            do_sample = bool(
                (temperature and temperature != 1.0)
                or (top_p is not None and top_p < 1)
                or top_k
                or (typical_p is not None and typical_p < 1)
            )
        if temperature == 0:
            do_sample = False
        if do_sample and seed is None:
            seed = random.randrange(2**63)  # reported back in details, so a sample can be reproduced
        return cls(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if temperature else 1.0,
            top_k=top_k or 0,
            top_p=1.0 if top_p is None else top_p,
            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
            seed=seed if do_sample else None,
            stop=tuple(stop),
            typical_p=1.0 if typical_p is None else typical_p,
            top_n_tokens=top_n_tokens,
            prefill_logprobs=prefill_logprobs,
        )


@dataclass(frozen=True)
class TopToken:
    """A scored token that is not (necessarily) the one generated: an alternative, or a prompt token. The
    prompt's first token has no logprob (nothing precedes it), as in TGI."""

    id: int
    text: str
    logprob: float | None
    special: bool


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # the token's text as TGI reports it (special tokens by name)
    logprob: float
    special: bool
    delta: str  # text this token adds to the visible answer (held back while it may be a stop string)
    top_tokens: tuple[TopToken, ...] = ()  # the SamplingParams.top_n_tokens most likely, best first


@dataclass(frozen=True)
class Finished:
    """The end of a generation. `last_token` is the token that ended it (None if it ended before one)."""

    last_token: Token | None
    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    tokens: tuple[Token, ...]
    prefill: tuple[TopToken, ...] = ()  # the prompt's tokens, scored when SamplingParams.prefill_logprobs
    # time.monotonic() when the request was submitted and when its first token was chosen (None if none was)
    submitted_at: float | None = None
    first_token_at: float | None = None


@dataclass(frozen=True)
class Failed:
    message: str
    expired_in_queue: bool = False


class GenerationHandle:
    """What a request holds: the stream of events the engine produces for it."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[Token | Finished | Failed] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.created = time.monotonic()

    def events(self, timeout: float | None = None) -> Iterator[Token | Finished]:
        """Token events, then one Finished. Raises GenerationError if the engine failed this request."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise GenerationError(f"the engine produced nothing for {timeout:.0f} s") from None
            if isinstance(event, Failed):
                raise (QueueTimeout if event.expired_in_queue else GenerationError)(event.message)
            yield event
            if isinstance(event, Finished):
                return

    def result(
        self,
        timeout: float | None = None,
        *,
        caller_gone: Callable[[], bool] | None = None,
        poll_s: float = 0.25,
    ) -> Finished:
        """The Finished event. With `caller_gone`, it is asked every `poll_s` while waiting: once it says yes,
        the generation is cancelled (its batch slot frees at the engine's next step) and its end awaited."""
        end = None if timeout is None else time.monotonic() + timeout
        next_check = time.monotonic() + poll_s
        while True:
            now = time.monotonic()
            if caller_gone is not None and not self.cancelled and now >= next_check:
                next_check = now + poll_s
                if caller_gone():
                    self.cancel()
            wait = None if end is None else max(0.0, end - now)
            if caller_gone is not None and not self.cancelled:
                wait = poll_s if wait is None else min(wait, poll_s)
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                if end is not None and time.monotonic() >= end:
                    raise GenerationError(f"the engine produced nothing for {timeout:.0f} s") from None
                continue
            if isinstance(event, Failed):
                raise (QueueTimeout if event.expired_in_queue else GenerationError)(event.message)
            if isinstance(event, Finished):
                return event

    def cancel(self) -> None:
        """The client went away: the engine drops the sequence at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, event: Token | Finished | Failed) -> None:
        """The engine's side: deliver the next event."""
        self._events.put(event)
