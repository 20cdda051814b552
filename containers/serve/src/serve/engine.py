"""A continuous-batching generation engine: one background thread owns the model and runs every request.

Why not transformers' own continuous batching (`model.init_continuous_batching`)? On this project's CPU
machines it ran concurrent requests slower than one plain `generate` at a time (its paged-attention path is
built for GPUs), and it has no per-request seeds, stop strings or do_sample. So this module is a compact
scheduler in the style of TGI/vLLM, on transformers' DynamicCache:

  each step:  admit waiting requests while the batch's KV cache stays within its token budget (one batched,
              left-padded prefill; their KV rows join the batch)
              -> one batched decode step for every running sequence (shared forward pass, KV cache)
              -> per sequence: choose the next token, turn it into text, check whether it stops
              -> finished sequences leave the batch.

Out of memory in a step retires the newest sequence (an error to it alone) and the others go on; a request
that waits in the queue past its deadline gets an error, not an empty answer. `health()` says when the engine
can no longer serve (its thread is gone, or step after step fails), for /ping.

The parts live in their own modules: the model and its batch's KV cache (runners: transformers, or llama.cpp
from serve.llamacpp), token choice (token_chooser), text (detokenizer) and stopping (stopping). Requests talk
to the engine through a GenerationHandle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from serve.detokenizer import IncrementalDetokenizer
from serve.generation import (
    CANCELLED,
    LENGTH,
    STOP,
    EngineStopped,
    Failed,
    Finished,
    GenerationHandle,
    QueueFull,
    SamplingParams,
    Token,
    TopToken,
)
from serve.runners import ModelRunner, PrefillCost, TransformersRunner
from serve.stopping import StoppingCriteria
from serve.token_chooser import NextTokenChooser, choose_next_tokens

log = logging.getLogger("serve.engine")

# At most this many prompt tokens are prefilled in one step, so running streams keep flowing.
MAX_PREFILL_TOKENS_PER_STEP = 8192
# This many failed steps in a row and the engine reports itself unhealthy (SageMaker then replaces the instance).
UNHEALTHY_AFTER_FAILED_STEPS = 3
# A request is refused at once (429) when the prompts queued ahead of it (and its own) would take more than this
# share of its time budget to prefill at the measured rate: better a fast "retry later" than a 503 after waiting
# a minute. The other half is for its answer, and for the estimate's error (the decode steps are not in it).
WAIT_SHARE_OF_BUDGET = 0.5
# Prefills of fewer tokens than this say more about per-step overhead than about the rate.
MIN_TOKENS_TO_MEASURE = 16
# A prompt whose own tokens are scored (SamplingParams.prefill_logprobs) needs the logits of every position, not
# just the last: it is prefilled alone, so no other request pays for them, and its log-softmax is taken this many
# positions at a time, so the float32 copy stays small whatever the prompt's length.
SCORING_CHUNK_POSITIONS = 256


@dataclass
class _Sequence:
    """One request inside the engine."""

    handle: GenerationHandle
    prompt_ids: list[int]
    params: SamplingParams
    chooser: NextTokenChooser
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    generated: list[int] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)  # the answer's text, as released to the request so far
    finished: bool = False
    first_token_at: float | None = None
    prefill: tuple[TopToken, ...] = ()  # the prompt scored, when its params ask (see _score_prompt)

    @property
    def max_length(self) -> int:
        """Its KV cache row at the longest: the prompt and every token it may generate."""
        return len(self.prompt_ids) + self.stopping.max_tokens


class Engine:
    """Owns the model; call start(), then submit() from any thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        eos_token_ids: Sequence[int],
        context_length: int,
        max_batch_size: int = 32,
        max_queue: int = 64,
        max_batch_total_tokens: int | None = None,
    ) -> None:
        """`model`: a transformers model, or a ModelRunner (serve.runners). `max_batch_total_tokens` bounds the
        batch's KV cache (rows x longest row, as left padding makes it): a waiting request is admitted only when
        the batch with it stays within (TGI's max_batch_total_tokens)."""
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_batch_total_tokens = max_batch_total_tokens or max_batch_size * context_length
        self._failed_steps = 0
        self._prefill_flops_per_s: float | None = None  # measured on this machine, this model: see _prefill
        self._prefilling: list[_Sequence] = []  # admitted, prompt not read yet: work ahead of a new request too
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_token_ids))
        self.runner: ModelRunner = model if isinstance(model, ModelRunner) else TransformersRunner(model, pad_id)
        self._cost: PrefillCost = self.runner.cost
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # row i of the runner's batch is self._running[i]
        self._pending = 0  # waiting + running, guarded by _lock
        self._deadline_cap = float("inf")
        self._stopped = False
        self._thread: threading.Thread | None = None

    # ----- public API (any thread) -----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, deadline: float) -> GenerationHandle:
        """Queue a request; raises QueueFull at once when SERVE_MAX_QUEUE requests are already in."""
        handle = GenerationHandle()
        seq = _Sequence(
            handle,
            list(prompt_ids),
            params,
            NextTokenChooser(params, prompt_ids, self.runner.device),
            StoppingCriteria(
                eos_token_ids=self.eos_token_ids,
                max_new_tokens=params.max_new_tokens,
                context_room=self.context_length - len(prompt_ids),
                deadline=deadline,
                stop=params.stop,
            ),
            IncrementalDetokenizer(self.tokenizer),
        )
        with self._lock:
            if self._stopped or (self._thread is not None and not self._thread.is_alive()):
                raise EngineStopped("the engine is stopped")
            if self._pending >= self.max_queue:
                raise QueueFull(
                    f"{self._pending} requests are already queued or running (SERVE_MAX_QUEUE="
                    f"{self.max_queue}); retry later"
                )
            wait = self._estimated_wait(len(seq.prompt_ids))
            room = deadline - time.monotonic()
            if wait is not None and wait > room * WAIT_SHARE_OF_BUDGET:
                raise QueueFull(
                    f"the prompts queued ahead would take about {wait:.0f} s to read, more than this request's "
                    f"{room:.0f} s; retry later"
                )
            self._pending += 1
            self._waiting.append(seq)
        self._wake.set()
        return handle

    def _estimated_wait(self, prompt_tokens: int) -> float | None:
        """Seconds until a new prompt of this length is prefilled, from the queue's prompts and the measured
        prefill rate (None before anything was measured). Caller holds the lock."""
        if not self._prefill_flops_per_s:
            return None
        ahead = [*self._prefilling, *self._waiting]
        queued = sum(self._cost.flops(len(s.prompt_ids)) for s in ahead) + self._cost.flops(prompt_tokens)
        return queued / self._prefill_flops_per_s

    def cap_deadlines(self, deadline: float) -> None:
        """Shutdown drain: every request, running or queued, must finish by `deadline` (cut as `timeout`)."""
        self._deadline_cap = deadline
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Requests queued or running now (for the queue-depth metric; read without the lock)."""
        return self._pending

    def health(self) -> str | None:
        """None while the engine can serve; else why not (for /ping). Failed steps make it unhealthy until a
        step succeeds again; requests still run meanwhile, so a few bad requests cannot take a worker out."""
        if not self.alive:
            return "the generation engine's thread is not running"
        if self._failed_steps >= UNHEALTHY_AFTER_FAILED_STEPS:
            return f"the last {self._failed_steps} generation steps failed"
        return None

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ----- the scheduler loop (engine thread only) -----

    def _loop(self) -> None:
        message = "the server is shutting down"
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        if self._stopped:
                            break
                        idle = not self._waiting and not self._running
                    if idle:
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
                        continue
                    try:
                        self._step()
                        self._failed_steps = 0
                    except Exception as e:  # a bad step fails the requests in it, not the server
                        self._failed_steps += 1
                        log.exception("generation step failed; failing %d running requests", len(self._running))
                        for seq in self._running:
                            self._finish(seq, None, failure=f"generation failed: {type(e).__name__}: {e}")
                        self._running = []
                        self.runner.clear()
                        with self._lock:
                            self._prefilling = []  # failed with the rest: no longer work ahead of anyone
        except BaseException as e:  # the thread dies: nobody may wait on it (health() now says so)
            message = f"the generation engine stopped: {type(e).__name__}: {e}"
            log.critical("%s", message, exc_info=True)
            raise
        finally:
            self._fail_all(message)

    def _step(self) -> None:
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self._running and not admitted:
            self._decode()
        self._retire()

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        budget = MAX_PREFILL_TOKENS_PER_STEP
        now = time.monotonic()
        with self._lock:
            expired = [
                s for s in self._waiting if s.handle.cancelled or now >= min(s.stopping.deadline, self._deadline_cap)
            ]
            for seq in expired:  # gave up, or waited past its deadline: answer now, not when a slot frees
                self._waiting.remove(seq)
            while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                candidate = self._waiting[0]
                if admitted and len(candidate.prompt_ids) > budget:
                    break
                if admitted and (candidate.params.prefill_logprobs or admitted[0].params.prefill_logprobs):
                    break  # a prompt to be scored is prefilled alone (see SCORING_CHUNK_POSITIONS)
                if (self._running or admitted) and not self._fits([*self._running, *admitted, candidate]):
                    break  # it waits for rows to free; alone it always fits (see Predictor's limits)
                budget -= len(candidate.prompt_ids)
                admitted.append(self._waiting.popleft())
            self._prefilling = admitted
        for seq in expired:
            if seq.handle.cancelled:
                self._finish(seq, CANCELLED)
            else:
                waited = now - seq.handle.created
                self._finish(
                    seq,
                    None,
                    failure=f"waited {waited:.0f} s in the queue without starting (the server is busy); retry later",
                    expired_in_queue=True,
                )
        return admitted

    def _fits(self, seqs: list[_Sequence]) -> bool:
        """Whether these sequences' KV cache, at their longest, stays within max_batch_total_tokens."""
        return len(seqs) * max(s.max_length for s in seqs) <= self.max_batch_total_tokens

    def _prefill(self, new: list[_Sequence]) -> None:
        self._running.extend(new)  # first, so a failing forward pass fails these requests too
        scored = new[0].params.prefill_logprobs  # then it is alone in this prefill (see _admit)
        started = time.perf_counter()
        try:
            out = self.runner.prefill([s.prompt_ids for s in new], every_position=scored)
        except Exception as e:
            if not out_of_memory(e):
                raise
            # The newest request goes; the others of this prefill wait at the front of the queue.
            del self._running[-len(new) :]
            self._finish(new[-1], None, failure=_out_of_memory_message(e))
            with self._lock:
                self._prefilling = []
                self._waiting.extendleft(reversed(new[:-1]))
            self.runner.release_memory()
            return
        if out.every_position is not None:  # before the first token: a request that ends with it reports it too
            new[0].prefill = self._score_prompt(new[0].prompt_ids, out.every_position)
        self._advance(new, out.last)  # reads the logits: the forward pass has finished
        if not scored:  # a scored prefill did more than read the prompt: it would skew the rate
            self._measure_prefill([len(s.prompt_ids) for s in new], time.perf_counter() - started)
        with self._lock:
            self._prefilling = []

    def _score_prompt(self, prompt_ids: list[int], logits: torch.Tensor) -> tuple[TopToken, ...]:
        """Each prompt token with its log-probability given the tokens before it (from `logits` [positions,
        vocab], one row per prompt position); the first has none, as in TGI's decoder_input_details."""
        targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logits.device)
        logprobs: list[float | None] = [None]
        for start in range(0, len(targets), SCORING_CHUNK_POSITIONS):
            rows = logits[start : start + SCORING_CHUNK_POSITIONS].float().log_softmax(-1)
            chosen = targets[start : start + SCORING_CHUNK_POSITIONS, None]
            logprobs += rows.gather(-1, chosen)[:, 0].tolist()
        return tuple(
            TopToken(token_id, text, logprob, token_id in self.special_ids)
            for token_id, text, logprob in zip(prompt_ids, self._token_texts(prompt_ids), logprobs, strict=True)
        )

    def _token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's text on its own, special tokens by name (as TGI reports prefill and top tokens)."""
        return self.tokenizer.batch_decode(
            [[token_id] for token_id in token_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _measure_prefill(self, prompt_lengths: list[int], seconds: float) -> None:
        if sum(prompt_lengths) < MIN_TOKENS_TO_MEASURE or seconds <= 0:
            return
        rate = sum(self._cost.flops(n) for n in prompt_lengths) / seconds
        previous = self._prefill_flops_per_s
        self._prefill_flops_per_s = rate if previous is None else 0.7 * previous + 0.3 * rate

    def _decode(self) -> None:
        last = [s.generated[-1] for s in self._running]
        positions = [len(s.prompt_ids) + len(s.generated) - 1 for s in self._running]
        try:
            logits = self.runner.decode(last, positions)
        except Exception as e:
            if not out_of_memory(e):
                raise
            # The newest sequence (the last admitted, the last row) goes; the others retry at the next step.
            self.runner.undo_step()
            self._finish(self._running[-1], None, failure=_out_of_memory_message(e))
            self._running.pop()
            self.runner.keep(list(range(len(self._running))))
            self.runner.release_memory()
            return
        self._advance(self._running, logits)

    def _retire(self) -> None:
        """Finished sequences leave the batch."""
        keep = [i for i, s in enumerate(self._running) if not s.finished]
        if len(keep) < len(self._running):
            self._running = [self._running[i] for i in keep]
            self.runner.keep(keep)

    # ----- one token per sequence (engine thread only) -----

    def _advance(self, batch: list[_Sequence], logits: torch.Tensor) -> None:
        chosen = choose_next_tokens([s.chooser for s in batch], logits)
        now = time.monotonic()
        for seq, choice in zip(batch, chosen, strict=True):
            if seq.handle.cancelled:
                self._finish(seq, CANCELLED)
            elif isinstance(choice, RuntimeError):  # its own sampling failed: it ends, its neighbours go on
                log.warning("token choice failed for one sequence: %s", choice)
                self._finish(seq, None, failure=f"choosing the next token failed: {choice}")
            else:
                self._append(seq, *choice, now)

    def _append(
        self,
        seq: _Sequence,
        token_id: int,
        logprob: float,
        alternatives: list[tuple[int, float]],
        now: float,
    ) -> None:
        seq.generated.append(token_id)
        if seq.first_token_at is None:
            seq.first_token_at = now
        reason = seq.stopping.limit(token_id, len(seq.generated), now, self._deadline_cap)
        text = seq.detokenizer.push(token_id)
        if reason is not None:  # nothing follows: an unfinished character goes out as it is
            text += seq.detokenizer.flush()
        delta, stopped = seq.stopping.release(text, final=reason is not None)
        if stopped:
            reason = STOP
        seq.shown.append(delta)
        special = token_id in self.special_ids
        token_text = self.tokenizer.decode([token_id], skip_special_tokens=False) if special else delta
        top_tokens: tuple[TopToken, ...] = ()
        if alternatives:  # asked for (SamplingParams.top_n_tokens): no tokenizer call otherwise
            texts = self._token_texts([top_id for top_id, _ in alternatives])
            top_tokens = tuple(
                TopToken(top_id, text, top_logprob, top_id in self.special_ids)
                for (top_id, top_logprob), text in zip(alternatives, texts, strict=True)
            )
        token = Token(token_id, token_text, logprob, special, delta, top_tokens)
        seq.tokens.append(token)
        if reason is None:
            seq.handle.put(token)
        else:  # the last token travels with the result, so a stream's final frame carries both (as in TGI)
            self._finish(seq, reason, last_token=token)

    def _finish(
        self,
        seq: _Sequence,
        reason: str | None,
        *,
        failure: str | None = None,
        expired_in_queue: bool = False,
        last_token: Token | None = None,
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        with self._lock:  # its queue slot frees as soon as its caller can see the answer
            self._pending -= 1
        if failure is not None:
            seq.handle.put(Failed(failure, expired_in_queue))
            return
        if last_token is None:  # ended between tokens (cancelled, timed out in the queue): show what there is
            seq.shown.append(seq.stopping.release(seq.detokenizer.flush(), final=True)[0])
        seq.handle.put(
            Finished(
                last_token=last_token,
                text="".join(seq.shown),
                finish_reason=reason or LENGTH,
                prompt_tokens=len(seq.prompt_ids),
                generated_tokens=len(seq.generated),
                seed=seq.params.seed,
                tokens=tuple(seq.tokens),
                prefill=seq.prefill,
                submitted_at=seq.handle.created,
                first_token_at=seq.first_token_at,
            )
        )

    def _fail_all(self, message: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in [*self._running, *waiting]:
            self._finish(seq, None, failure=message)
        self._running = []


def out_of_memory(error: Exception) -> bool:
    """A step that ran out of memory: CUDA's own error, or the CPU allocator's."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _out_of_memory_message(error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"out of memory while generating; retry with a shorter prompt or answer ({first_line[:200]})"
