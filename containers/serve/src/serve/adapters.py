"""One adapter per request shape: how a request becomes engine jobs (`plan`), and how their results go
back as one reply (`reply`) or as server-sent events (`stream`).

- TGI generate, `{"inputs", "parameters", "stream"}`: `[{"generated_text", "details"}]`, or one SSE frame
  per token whose last carries the whole text and details.
- OpenAI chat, `{"messages", ...}`: `chat.completion`, or `chat.completion.chunk` frames ending in
  `data: [DONE]`.
- JSON Lines (batch transform): one of the above per line in, the same JSON a single request would get
  per line out, in order; no streaming.

A JSON body's shape is chosen by its keys, as TGI's /invocations does: `messages` is chat, `inputs` is TGI.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from serve.errors import ServeError, ValidationError
from serve.generation import EOS, STOP, Finished, PromptError, SamplingParams, Token
from serve.json_body import decode_utf8, load_json
from serve.schemas import ChatRequest, GenerateRequest, GenerationLimits, validate

if TYPE_CHECKING:
    from serve.config import ServeConfig
    from serve.predictor import Predictor

JSON = "application/json"
JSONLINES = "application/jsonlines"
_SHAPES = "body: expected a JSON object with `inputs` (TGI style) or `messages` (OpenAI chat)"


@dataclass(frozen=True)
class Job:
    """One generation a request asks for, and what its reply needs to know besides the result."""

    prompt_ids: list[int]
    sampling: SamplingParams
    prefix: str = ""  # put before the generated text (TGI's return_full_text)
    details: bool = False  # TGI: reply with details
    model: str = ""  # chat: the model name the reply echoes
    line: int = 0  # JSON Lines: the line this job answers


class Adapter(Protocol):
    media_type: str  # of a reply (a stream is text/event-stream)

    def plan(self, request: Any, predictor: Predictor) -> list[Job]:
        """The request's jobs, prompts encoded and fitted to the context; 422 when a prompt cannot be."""

    def reply(self, request: Any, jobs: list[Job], results: list[Finished]) -> str:
        """The reply body, from every job's result."""

    def stream(self, request: Any, jobs: list[Job], events: Iterator[Token | Finished]) -> Iterator[str]:
        """SSE frames from the one job's events (requests with `stream` true only)."""


def parse_json(body: bytes, limits: GenerationLimits) -> tuple[Adapter, GenerateRequest | ChatRequest]:
    """A JSON body: its adapter, chosen by its keys, and the validated request."""
    return parse_value(load_json(decode_utf8(body), where="body"), limits)


def parse_value(value: object, limits: GenerationLimits) -> tuple[Adapter, GenerateRequest | ChatRequest]:
    if not isinstance(value, dict):
        raise ValidationError(_SHAPES)
    if "messages" in value:
        return OPENAI_CHAT, validate(ChatRequest, value, limits)
    if "inputs" in value:
        return TGI_GENERATE, validate(GenerateRequest, value, limits)
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
        for i, text in enumerate(request.texts):
            field = "inputs" if isinstance(request.inputs, str) else f"inputs.{i}"
            try:
                ids = predictor.encode_question(text, apply_chat_template=params.apply_chat_template)
                ids = predictor.fit_context(ids, truncate=params.truncate, field=field)
            except PromptError as e:
                raise ValidationError(str(e)) from None
            prefix = text if params.return_full_text else ""
            jobs.append(Job(ids, request.sampling(), prefix=prefix, details=params.details))
        return jobs

    def reply(self, request: GenerateRequest, jobs: list[Job], results: list[Finished]) -> str:
        return _json([self._item(job, result) for job, result in zip(jobs, results, strict=True)])

    def stream(self, request: GenerateRequest, jobs: list[Job], events: Iterator[Token | Finished]) -> Iterator[str]:
        """One SSE frame per token; the last frame carries the whole text and details (TGI's shape)."""
        for index, event in enumerate(events, start=1):
            if isinstance(event, Token):
                yield sse({"index": index, "token": _tgi_token(event), "generated_text": None, "details": None})
                continue
            token = _tgi_token(event.last_token) if event.last_token else None
            text = jobs[0].prefix + event.text
            yield sse({"index": index, "token": token, "generated_text": text, "details": _tgi_details(event)})

    @staticmethod
    def _item(job: Job, result: Finished) -> dict:
        item: dict = {"generated_text": job.prefix + result.text}
        if job.details:
            item["details"] = {
                **_tgi_details(result),
                "prefill": [],
                "tokens": [_tgi_token(t) for t in result.tokens],
            }
        return item


def _tgi_details(result: Finished) -> dict:
    return {
        "finish_reason": result.finish_reason,
        "generated_tokens": result.generated_tokens,
        "input_length": result.prompt_tokens,
        "seed": result.seed,
    }


def _tgi_token(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "logprob": round(token.logprob, 6), "special": token.special}


# ----- OpenAI chat -----


class OpenAIChat:
    media_type = JSON

    def plan(self, request: ChatRequest, predictor: Predictor) -> list[Job]:
        try:
            ids = predictor.encode_chat(request.conversation(), field="messages")
            ids = predictor.fit_context(ids, truncate=None, field="messages")
        except PromptError as e:
            raise ValidationError(str(e)) from None
        return [Job(ids, request.sampling(), model=request.model or predictor.model_name)]

    def reply(self, request: ChatRequest, jobs: list[Job], results: list[Finished]) -> str:
        result = results[0]
        return _json(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": jobs[0].model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "logprobs": None,
                        "finish_reason": _chat_finish_reason(result.finish_reason),
                    }
                ],
                "usage": _usage(result.prompt_tokens, result.generated_tokens),
            }
        )

    def stream(self, request: ChatRequest, jobs: list[Job], events: Iterator[Token | Finished]) -> Iterator[str]:
        """`chat.completion.chunk` frames: the role, one content delta per token, the finish reason, [DONE]."""
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": jobs[0].model,
        }

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return sse(
                {
                    **base,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                }
            )

        yield chunk({"role": "assistant", "content": ""})
        for event in events:
            if isinstance(event, Token):
                if event.delta:
                    yield chunk({"content": event.delta})
                continue
            if event.last_token is not None and event.last_token.delta:
                yield chunk({"content": event.last_token.delta})
            yield chunk({}, _chat_finish_reason(event.finish_reason))
            if (request.stream_options or {}).get("include_usage"):
                yield sse({**base, "choices": [], "usage": _usage(event.prompt_tokens, event.generated_tokens)})
        yield sse("[DONE]")


def _chat_finish_reason(reason: str) -> str:
    return "stop" if reason in (EOS, STOP) else reason  # length, timeout, cancelled keep their names


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
JSON_LINES = JsonLines()
