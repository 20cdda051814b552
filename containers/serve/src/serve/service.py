"""What /invocations does, between the wire models and the engine: plan jobs, run them, shape replies.

Reply shapes follow TGI (`[{"generated_text", "details"}]`, SSE token frames) and OpenAI chat
(`chat.completion`, `chat.completion.chunk` frames ending in `data: [DONE]`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from serve.engine import (
    EOS,
    STOP,
    EngineStopped,
    Finished,
    GenerationError,
    GenerationHandle,
    QueueFull,
    SamplingParams,
    Token,
)
from serve.errors import GenerationFailed, NotReady, Overloaded, ValidationError
from serve.predictor import Predictor, PromptError
from serve.schemas import ChatRequest, GenerateRequest

# How long a request thread waits on the engine beyond the generation budget before giving up.
RESULT_GRACE_S = 30.0


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    sampling: SamplingParams
    input_text: str  # prepended when return_full_text
    return_full_text: bool = False
    details: bool = False


@dataclass
class Outcome:
    """What the access log reports about a request."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str | None = None


def plan(request: GenerateRequest | ChatRequest, predictor: Predictor) -> list[Job]:
    default = predictor.config.default_max_new_tokens
    try:
        if isinstance(request, ChatRequest):
            ids = predictor.encode_chat(request.conversation(), field="messages")
            ids = predictor.fit_context(ids, truncate=None, field="messages")
            return [Job(ids, request.sampling(default), "")]
        params = request.parameters
        inputs = request.inputs if isinstance(request.inputs, list) else [request.inputs]
        jobs = []
        for i, text in enumerate(inputs):
            field = "inputs" if isinstance(request.inputs, str) else f"inputs.{i}"
            ids = predictor.encode_question(text, apply_chat_template=params.apply_chat_template)
            ids = predictor.fit_context(ids, truncate=params.truncate, field=field)
            jobs.append(Job(ids, params.sampling(default), text, params.return_full_text, params.details))
        return jobs
    except PromptError as e:
        raise ValidationError(str(e)) from None


def submit_all(jobs: list[Job], predictor: Predictor) -> list[GenerationHandle]:
    """All or nothing: if the queue fills half-way, the queued jobs are cancelled and we answer 429."""
    handles: list[GenerationHandle] = []
    try:
        for job in jobs:
            handles.append(predictor.submit(job.prompt_ids, job.sampling))
    except QueueFull as e:
        for handle in handles:
            handle.cancel()
        raise Overloaded(str(e)) from None
    except EngineStopped as e:
        for handle in handles:
            handle.cancel()
        raise NotReady(str(e)) from None
    return handles


def wait_all(handles: list[GenerationHandle], predictor: Predictor) -> list[Finished]:
    timeout = predictor.config.generation_budget_s + RESULT_GRACE_S
    try:
        return [handle.result(timeout=timeout) for handle in handles]
    except GenerationError as e:
        for handle in handles:
            handle.cancel()
        raise GenerationFailed(str(e)) from None


def record(outcome: Outcome, results: list[Finished]) -> None:
    outcome.prompt_tokens = sum(r.prompt_tokens for r in results)
    outcome.generated_tokens = sum(r.generated_tokens for r in results)
    outcome.finish_reason = results[-1].finish_reason if results else None


# ----- TGI shapes -----


def tgi_reply(jobs: list[Job], results: list[Finished]) -> list[dict]:
    return [_tgi_item(job, result) for job, result in zip(jobs, results, strict=True)]


def _tgi_item(job: Job, result: Finished) -> dict:
    text = job.input_text + result.text if job.return_full_text else result.text
    item: dict = {"generated_text": text}
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


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def tgi_stream(job: Job, handle: GenerationHandle, predictor: Predictor, outcome: Outcome) -> Iterator[str]:
    """One SSE frame per token; the last frame carries the whole text and details (TGI's shape)."""
    index = 0
    for event in handle.events(timeout=predictor.config.generation_budget_s + RESULT_GRACE_S):
        index += 1
        if isinstance(event, Token):
            yield sse({"index": index, "token": _tgi_token(event), "generated_text": None, "details": None})
            continue
        record(outcome, [event])
        token = _tgi_token(event.last_token) if event.last_token else None
        text = job.input_text + event.text if job.return_full_text else event.text
        yield sse({"index": index, "token": token, "generated_text": text, "details": _tgi_details(event)})


# ----- OpenAI chat shapes -----


def _chat_finish_reason(reason: str) -> str:
    return "stop" if reason in (EOS, STOP) else reason  # length, timeout, cancelled keep their names


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_reply(request: ChatRequest, result: Finished, model_name: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model or model_name,
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


def chat_stream(
    request: ChatRequest, handle: GenerationHandle, predictor: Predictor, outcome: Outcome
) -> Iterator[str]:
    """`chat.completion.chunk` frames: the role, one content delta per token, the finish reason, [DONE]."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model or predictor.model_name,
    }

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return sse(
            {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
        )

    yield chunk({"role": "assistant", "content": ""})
    for event in handle.events(timeout=predictor.config.generation_budget_s + RESULT_GRACE_S):
        if isinstance(event, Token):
            if event.delta:
                yield chunk({"content": event.delta})
            continue
        record(outcome, [event])
        if event.last_token is not None and event.last_token.delta:
            yield chunk({"content": event.last_token.delta})
        yield chunk({}, _chat_finish_reason(event.finish_reason))
        if (request.stream_options or {}).get("include_usage"):
            yield sse({**base, "choices": [], "usage": _usage(event.prompt_tokens, event.generated_tokens)})
    yield sse("[DONE]")


# ----- batch transform -----


def execution_parameters(config) -> dict:
    """SageMaker batch transform asks this once; its job settings win over ours when set."""
    payload_mb = config.max_payload_mb
    # The platform requires MaxConcurrentTransforms * MaxPayloadInMB <= 100.
    concurrent = max(1, min(config.workers * config.max_batch_size, 100 // payload_mb))
    return {
        "MaxConcurrentTransforms": concurrent,
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": payload_mb,
    }
