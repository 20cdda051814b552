"""One adapter per request shape: how a request becomes engine jobs (`plan`), and how their results go
back as one reply (`reply`) or as server-sent events (`stream`).

- TGI generate, `{"inputs", "parameters", "stream"}`: `[{"generated_text", "details"}]`, or one SSE frame
  per token whose last carries the whole text and details.
- OpenAI chat, `{"messages", ...}`: `chat.completion`, or `chat.completion.chunk` frames ending in
  `data: [DONE]`; with `n`, several choices (also on POST /v1/chat/completions, see openai_routes).
- OpenAI completions, `{"prompt", ...}` (POST /v1/completions only): `text_completion`, or its chunks; raw
  text, never retrieval.

When the model ships a retrieval index, TGI and chat requests retrieve (unless they say `retrieval: false`):
the reply carries `sources`, the passages in the prompt: on each TGI item and its stream's last frame, on the
chat completion and on each choice's finishing chunk.
- JSON Lines (batch transform): one of the above per line in, the same JSON a single request would get
  per line out, in order; no streaming.

A JSON body's shape is chosen by its keys, as TGI's /invocations does: `messages` is chat, `inputs` is TGI.
"""

from __future__ import annotations

import functools
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from serve.errors import ServeError, ValidationError
from serve.generation import EOS, STOP, Finished, PromptError, SamplingParams, Token, TopToken
from serve.json_body import decode_utf8, load_json
from serve.schemas import ChatRequest, CompletionRequest, GenerateRequest, GenerationLimits, validate

if TYPE_CHECKING:
    from serve.config import ServeConfig
    from serve.predictor import Predictor

JSON = "application/json"
JSONLINES = "application/jsonlines"
_SHAPES = (
    "body: expected a JSON object with `inputs` (TGI style), `messages` (OpenAI chat) or `prompt` (OpenAI completions)"
)


@dataclass(frozen=True)
class Job:
    """One generation a request asks for, and what its reply needs to know besides the result."""

    prompt_ids: list[int]
    sampling: SamplingParams
    prefix: str = ""  # put before the generated text (TGI's return_full_text)
    details: bool = False  # TGI: reply with details
    model: str = ""  # OpenAI: the model the reply names (the one this server hosts)
    token_text: Callable[[int], str] | None = None  # OpenAI, when logprobs are asked: a token id's own text
    line: int = 0  # JSON Lines: the line this job answers
    sources: list[dict] | None = None  # the retrieved passages in the prompt (None: retrieval did not apply)


class Adapter(Protocol):
    media_type: str  # of a reply (a stream is text/event-stream)

    def plan(self, request: Any, predictor: Predictor) -> list[Job]:
        """The request's jobs, prompts encoded and fitted to the context; 422 when a prompt cannot be."""

    def reply(self, request: Any, jobs: list[Job], results: list[Finished]) -> str:
        """The reply body, from every job's result."""

    def stream(self, request: Any, jobs: list[Job], events: Iterator[Token | Finished]) -> Iterator[str]:
        """SSE frames from the one job's events (requests with `stream` true only)."""


def parse_json(
    body: bytes, limits: GenerationLimits
) -> tuple[Adapter, GenerateRequest | ChatRequest | CompletionRequest]:
    """A JSON body: its adapter, chosen by its keys, and the validated request."""
    return parse_value(load_json(decode_utf8(body), where="body"), limits)


def parse_value(
    value: object, limits: GenerationLimits
) -> tuple[Adapter, GenerateRequest | ChatRequest | CompletionRequest]:
    if not isinstance(value, dict):
        raise ValidationError(_SHAPES)
    if "messages" in value:
        return OPENAI_CHAT, validate(ChatRequest, value, limits)
    if "inputs" in value:
        return TGI_GENERATE, validate(GenerateRequest, value, limits)
    if "prompt" in value:  # SageMaker forwards only /invocations: OpenAI's completions shape comes in here too
        return OPENAI_COMPLETION, validate(CompletionRequest, value, limits)
    raise ValidationError(_SHAPES)


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _json(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False)


# ----- TGI generate -----


class TgiGenerate:
    media_type = JSON

    def plan(self, request: GenerateRequest, predictor: Predictor) -> list[Job]:
        params = request.parameters
        jobs = []
        try:
            retrieve = params.apply_chat_template and predictor.wants_retrieval(
                params.retrieval, field="parameters.retrieval"
            )
        except PromptError as e:
            raise ValidationError(str(e)) from None
        for i, text in enumerate(request.texts):
            field = "inputs" if isinstance(request.inputs, str) else f"inputs.{i}"
            try:
                if retrieve:  # each input is its own question, with its own passages
                    prompt = predictor.prepare_chat(
                        [{"role": "user", "content": text}], field=field, retrieve=True, truncate=params.truncate
                    )
                    ids, sources = prompt.ids, prompt.sources
                else:
                    ids = predictor.encode_question(text, apply_chat_template=params.apply_chat_template)
                    ids, sources = predictor.fit_context(ids, truncate=params.truncate, field=field), None
            except PromptError as e:
                raise ValidationError(str(e)) from None
            prefix = text if params.return_full_text else ""
            jobs.append(Job(ids, request.sampling(), prefix=prefix, details=params.wants_details, sources=sources))
        return jobs

    def reply(self, request: GenerateRequest, jobs: list[Job], results: list[Finished]) -> str:
        return _json([self._item(job, result) for job, result in zip(jobs, results, strict=True)])

    def stream(self, request: GenerateRequest, jobs: list[Job], events: Iterator[Token | Finished]) -> Iterator[str]:
        """One SSE frame per token, TGI's StreamResponse: `index`, `token`, `top_tokens` (when asked for),
        `generated_text` and `details` (null but on the last frame, which carries the whole text; there, TGI's
        StreamDetails when `details` is asked for, null otherwise, as TGI sends them)."""
        top_n = jobs[0].sampling.top_n_tokens
        for index, event in enumerate(events, start=1):
            if isinstance(event, Token):
                yield sse(_tgi_frame(index, event, top_n, None, None))
                continue
            details = None
            if request.parameters.details:
                details = {**_tgi_details(event), "input_length": event.prompt_tokens}
            frame = _tgi_frame(index, event.last_token, top_n, jobs[0].prefix + event.text, details)
            if jobs[0].sources is not None:
                frame["sources"] = jobs[0].sources
            yield sse(frame)

    @staticmethod
    def _item(job: Job, result: Finished) -> dict:
        item: dict = {"generated_text": job.prefix + result.text}
        if job.details:
            details = {
                **_tgi_details(result),
                "prefill": [_tgi_prefill_token(t) for t in result.prefill],
                "tokens": [_tgi_token(t) for t in result.tokens],
            }
            if job.sampling.top_n_tokens:  # TGI leaves it out when empty
                details["top_tokens"] = [[_tgi_token(t) for t in token.top_tokens] for token in result.tokens]
            details["input_length"] = result.prompt_tokens  # ours, beyond TGI's Details: callers read it
            item["details"] = details
        if job.sources is not None:  # ours: TGI's clients ignore (text_generation) or keep (huggingface_hub) it
            item["sources"] = job.sources
        return item


def _tgi_frame(index: int, token: Token | None, top_n: int, text: str | None, details: dict | None) -> dict:
    frame: dict = {"index": index, "token": _tgi_token(token) if token else None}
    if top_n:  # TGI leaves it out when empty
        frame["top_tokens"] = [_tgi_token(t) for t in token.top_tokens] if token else []
    frame["generated_text"] = text
    frame["details"] = details
    return frame


def _tgi_details(result: Finished) -> dict:
    """TGI's Details, but prefill and tokens (and best_of_sequences: best_of is 1 here, so TGI leaves it out)."""
    return {
        "finish_reason": result.finish_reason,
        "generated_tokens": result.generated_tokens,
        "seed": result.seed,
    }


def _tgi_token(token: Token | TopToken) -> dict:
    return {"id": token.id, "text": token.text, "logprob": _logprob(token.logprob), "special": token.special}


def _tgi_prefill_token(token: TopToken) -> dict:
    """TGI's PrefillToken: no `special`; the prompt's first token has no logprob (null)."""
    return {"id": token.id, "text": token.text, "logprob": _logprob(token.logprob)}


def _logprob(value: float | None) -> float | None:
    """Rounded as before; null when there is none, or when it is -inf (a token the model rules out, which JSON
    cannot carry)."""
    if value is None or value == float("-inf"):
        return None
    return round(value, 6)


# ----- OpenAI chat completions and (legacy) completions -----


class OpenAIAdapter:
    """What the two OpenAI shapes share: `n` choices, usage, streams that end in [DONE]. Subclasses say how a
    request becomes jobs, what one choice looks like, and what one chunk of a choice carries."""

    media_type = JSON
    id_prefix = ""
    reply_object = ""
    chunk_object = ""

    def jobs(self, request: Any, predictor: Predictor) -> list[Job]:
        raise NotImplementedError

    def plan(self, request: Any, predictor: Predictor) -> list[Job]:
        # /invocations streams one generation's events (routes._stream); /v1 streams all n (openai_routes).
        if request.stream and request.n > 1:
            raise ValidationError("n: a stream on /invocations carries one choice; POST /v1/... streams n > 1")
        jobs = self.jobs(request, predictor)
        if request.stream and len(jobs) > 1:  # a completions request's list of prompts
            raise ValidationError("prompt: a stream on /invocations carries one prompt; send a string")
        return jobs

    def reply(self, request: Any, jobs: list[Job], results: list[Finished]) -> str:
        choices = [
            {
                "index": i,
                **self._choice(request, job, result),
                "finish_reason": _chat_finish_reason(result.finish_reason),
            }
            for i, (job, result) in enumerate(zip(jobs, results, strict=True))
        ]
        reply = {
            "id": f"{self.id_prefix}-{uuid.uuid4().hex}",
            "object": self.reply_object,
            "created": int(time.time()),
            "model": jobs[0].model,
            "choices": choices,
            "usage": _usage_of(request, results),
        }
        if jobs[0].sources is not None:  # one prompt, so one list for all n choices
            reply["sources"] = jobs[0].sources
        return _json(reply)

    def stream(self, request: Any, jobs: list[Job], events: Iterator[Token | Finished]) -> Iterator[str]:
        """/invocations: the one choice's events."""
        return self.stream_choices(request, jobs, [events])

    def stream_choices(self, request: Any, jobs: list[Job], choices: list[Iterator[Token | Finished]]) -> Iterator[str]:
        """Chunks for every choice (one after the other; each chunk names its choice's `index`), then the usage
        chunk when `stream_options.include_usage` asks, then `data: [DONE]`."""
        base = {
            "id": f"{self.id_prefix}-{uuid.uuid4().hex}",
            "object": self.chunk_object,
            "created": int(time.time()),
            "model": jobs[0].model,
        }
        if request.include_usage:  # as OpenAI: every chunk has `usage`, null but on the last
            base["usage"] = None
        finished: list[Finished] = []
        for index, (job, events) in enumerate(zip(jobs, choices, strict=True)):
            yield from self._choice_chunks(request, job, index, events, base, finished)
        if request.include_usage:
            yield sse({**base, "choices": [], "usage": _usage_of(request, finished)})
        yield sse("[DONE]")

    def _choice_chunks(
        self, request: Any, job: Job, index: int, events: Iterator[Token | Finished], base: dict, finished: list
    ) -> Iterator[str]:
        def chunk(text: str | None, tokens: list[Token], finish_reason: str | None = None) -> str:
            delta = self._delta(request, job, text, tokens, len(sent) - len(text or ""))
            frame = {**base, "choices": [{"index": index, **delta, "finish_reason": finish_reason}]}
            if finish_reason is not None and job.sources is not None:
                frame["sources"] = job.sources
            return sse(frame)

        sent, pending = job.prefix, []  # text already streamed; tokens whose logprobs are not yet sent
        if (opening := self._opening(job)) is not None:
            yield sse({**base, "choices": [{"index": index, **opening, "finish_reason": None}]})
        for event in events:
            if isinstance(event, Token):
                pending.append(event)
                if event.delta:  # held-back tokens go out with the first one that shows text
                    sent += event.delta
                    yield chunk(event.delta, pending)
                    pending = []
                continue
            finished.append(event)
            if event.last_token is not None:
                pending.append(event.last_token)
            # What the last token released, or what was held back when it ended between tokens.
            rest = (job.prefix + event.text)[len(sent) :]
            sent += rest
            if rest or (pending and job.token_text is not None):
                yield chunk(rest, pending)
            yield chunk(None, [], _chat_finish_reason(event.finish_reason))

    def _opening(self, job: Job) -> dict | None:
        """A choice's first chunk, before any token (None: none)."""
        raise NotImplementedError

    def _choice(self, request: Any, job: Job, result: Finished) -> dict:
        raise NotImplementedError

    def _delta(self, request: Any, job: Job, text: str | None, tokens: list[Token], offset: int) -> dict:
        """One chunk's part of a choice: `text` (None: the choice's closing chunk), with `tokens`' logprobs,
        the first at character `offset` of the choice's text."""
        raise NotImplementedError


class OpenAIChat(OpenAIAdapter):
    id_prefix, reply_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def jobs(self, request: ChatRequest, predictor: Predictor) -> list[Job]:
        try:
            retrieve = predictor.wants_retrieval(request.retrieval, field="retrieval")
            prompt = predictor.prepare_chat(request.conversation(), field="messages", retrieve=retrieve)
        except PromptError as e:
            raise ValidationError(str(e)) from None
        token_text = _token_text(predictor) if request.logprobs else None
        return [
            Job(
                prompt.ids,
                request.sampling(choice),
                model=predictor.model_name,
                token_text=token_text,
                sources=prompt.sources,
            )
            for choice in range(request.n)
        ]

    def _opening(self, job: Job) -> dict | None:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None}

    def _choice(self, request: ChatRequest, job: Job, result: Finished) -> dict:
        return {
            "message": {"role": "assistant", "content": result.text},
            "logprobs": self._logprobs(request, job, list(result.tokens)),
        }

    def _delta(self, request: ChatRequest, job: Job, text: str | None, tokens: list[Token], offset: int) -> dict:
        if text is None:  # the choice's last chunk: its finish_reason only
            return {"delta": {}, "logprobs": None}
        return {"delta": {"content": text}, "logprobs": self._logprobs(request, job, tokens) if tokens else None}

    @staticmethod
    def _logprobs(request: ChatRequest, job: Job, tokens: list[Token]) -> dict | None:
        """OpenAI's choices[].logprobs: each token's text, logprob and UTF-8 bytes, with its top alternatives."""
        if job.token_text is None:
            return None
        top = request.top_logprobs or 0

        def entry(text: str, logprob: float | None) -> dict:
            return {"token": text, "logprob": _openai_logprob(logprob), "bytes": list(text.encode("utf-8"))}

        content = [
            {
                **entry(job.token_text(t.id), t.logprob),
                "top_logprobs": [entry(a.text, a.logprob) for a in t.top_tokens[:top]],
            }
            for t in tokens
        ]
        return {"content": content, "refusal": None}


class OpenAICompletion(OpenAIAdapter):
    id_prefix, reply_object, chunk_object = "cmpl", "text_completion", "text_completion"

    def jobs(self, request: CompletionRequest, predictor: Predictor) -> list[Job]:
        """n jobs per prompt, prompt after prompt: choice k answers prompt k // n, as OpenAI orders them."""
        token_text = _token_text(predictor) if request.logprobs is not None else None
        jobs = []
        for i, text in enumerate(request.prompts):
            field = "prompt" if isinstance(request.prompt, str) else f"prompt.{i}"
            try:
                ids = predictor.fit_context(predictor.encode_raw(text), truncate=None, field=field)
            except PromptError as e:
                raise ValidationError(str(e)) from None
            prefix = text if request.echo else ""
            for choice in range(request.n):
                jobs.append(
                    Job(ids, request.sampling(choice), prefix=prefix, model=predictor.model_name, token_text=token_text)
                )
        return jobs

    def _opening(self, job: Job) -> dict | None:
        return {"text": job.prefix, "logprobs": None} if job.prefix else None  # echo: the prompt comes first

    def _choice(self, request: CompletionRequest, job: Job, result: Finished) -> dict:
        return {
            "text": job.prefix + result.text,
            "logprobs": self._logprobs(request, job, list(result.tokens), len(job.prefix)),
        }

    def _delta(self, request: CompletionRequest, job: Job, text: str | None, tokens: list[Token], offset: int) -> dict:
        return {"text": text or "", "logprobs": self._logprobs(request, job, tokens, offset) if tokens else None}

    @staticmethod
    def _logprobs(request: CompletionRequest, job: Job, tokens: list[Token], offset: int) -> dict | None:
        """OpenAI's legacy logprobs: parallel lists of token texts, their logprobs, the top `logprobs` alternatives
        (and the chosen token, always, as OpenAI does), and each token's character offset in the text."""
        if job.token_text is None:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token in tokens:
            text = job.token_text(token.id)
            top = {a.text: _openai_logprob(a.logprob) for a in token.top_tokens[: request.logprobs]}
            top.setdefault(text, _openai_logprob(token.logprob))
            out["tokens"].append(text)
            out["token_logprobs"].append(_openai_logprob(token.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def _token_text(predictor: Predictor) -> Callable[[int], str]:
    """A token's own text (special tokens by name), as the engine reports alternatives' texts."""
    tokenizer = predictor.loaded.tokenizer

    @functools.lru_cache(maxsize=4096)
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return text


# A token the model rules out has logprob -inf, which JSON cannot carry; OpenAI's clients expect a number.
MIN_OPENAI_LOGPROB = -9999.0  # vLLM's floor for the same reason


def _openai_logprob(value: float | None) -> float | None:
    return None if value is None else max(value, MIN_OPENAI_LOGPROB)


def _chat_finish_reason(reason: str) -> str:
    return "stop" if reason in (EOS, STOP) else reason  # length, timeout, cancelled keep their names


def _usage_of(request: Any, results: list[Finished]) -> dict:
    """Each prompt counted once however many choices it got; every choice's tokens counted."""
    prompts = results[:: request.n]
    return _usage(sum(r.prompt_tokens for r in prompts), sum(r.generated_tokens for r in results))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ----- JSON Lines (batch transform) -----

# Records in one JSON Lines body (batch transform's MULTI_RECORD): each becomes a job; bound their number.
MAX_JSONLINES_RECORDS = 10_000


@dataclass(frozen=True)
class JsonLinesBody:
    """A JSON Lines body: each line's adapter and request, in order."""

    lines: list[tuple[Adapter, GenerateRequest | ChatRequest]]
    stream = False  # one reply per line, never a stream


class JsonLines:
    media_type = JSONLINES

    def parse(self, body: bytes, limits: GenerationLimits) -> JsonLinesBody:
        lines = []
        texts = [line for line in decode_utf8(body).splitlines() if line.strip()]
        if len(texts) > MAX_JSONLINES_RECORDS:
            raise ValidationError(
                f"{len(texts)} records in one body; at most {MAX_JSONLINES_RECORDS} (split the input file, or "
                "let batch transform split it: SplitType=Line)"
            )
        for number, text in enumerate(texts, start=1):
            value = load_json(text, where=f"line {number}")
            with _naming_the_line(number):
                adapter, request = parse_value(value, limits)
                if request.stream:
                    raise ValidationError("stream: not available for application/jsonlines bodies")
            lines.append((adapter, request))
        return JsonLinesBody(lines)

    def plan(self, body: JsonLinesBody, predictor: Predictor) -> list[Job]:
        jobs = []
        for number, (adapter, request) in enumerate(body.lines, start=1):
            with _naming_the_line(number):
                jobs.extend(replace(job, line=number) for job in adapter.plan(request, predictor))
        return jobs

    def reply(self, body: JsonLinesBody, jobs: list[Job], results: list[Finished]) -> str:
        answered = itertools.groupby(zip(jobs, results, strict=True), key=lambda pair: pair[0].line)
        out = []
        for (adapter, request), (_, pairs) in zip(body.lines, answered, strict=True):
            mine_jobs, mine_results = zip(*pairs, strict=True)
            out.append(adapter.reply(request, list(mine_jobs), list(mine_results)) + "\n")
        return "".join(out)


@contextmanager
def _naming_the_line(number: int) -> Iterator[None]:
    """Errors raised inside start with `line N: `, so a batch's caller knows which request to fix."""
    try:
        yield
    except ServeError as e:
        e.message = f"line {number}: {e.message}"
        raise


def concurrent_transforms(config: ServeConfig) -> int:
    """How many batch-transform bodies at once we advertise: the platform requires MaxConcurrentTransforms x
    MaxPayloadInMB <= 100, and every body must be able to keep records in flight within one worker's queue."""
    return max(1, min(100 // config.max_payload_mb, config.max_queue))


def records_in_flight(config: ServeConfig) -> int:
    """Records of one JSON Lines body in the queue at once: the advertised concurrent bodies, all landing on one
    worker, then fill its queue and no more, so a body of any length is fed through, never refused with 429."""
    return max(1, config.max_queue // concurrent_transforms(config))


def execution_parameters(config: ServeConfig) -> dict:
    """What SageMaker batch transform asks once at GET /execution-parameters; its job settings win over ours."""
    return {
        "MaxConcurrentTransforms": concurrent_transforms(config),
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": config.max_payload_mb,
    }


TGI_GENERATE = TgiGenerate()
OPENAI_CHAT = OpenAIChat()
OPENAI_COMPLETION = OpenAICompletion()
JSON_LINES = JsonLines()
