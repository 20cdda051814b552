"""OpenAI-compatible routes, for OpenAI's and huggingface_hub's clients (`base_url=http://host:8080/v1`):
POST /v1/chat/completions, POST /v1/completions, GET /v1/models (and /v1/models/<id>).

The same engine, adapters, limits and ready check as /invocations (serve.routes); errors in OpenAI's shape
(serve.errors.openai_error_body), 400 for a bad field as OpenAI and vLLM answer. SageMaker forwards only
/ping and /invocations, so on an endpoint these shapes are sent to /invocations (serve.adapters); they serve
local runs, ECS/EKS and anything else that reaches the container's port directly.

`model` in a request is accepted whatever it says, as TGI does (huggingface_hub sends "dummy" or the URL);
vLLM would answer 404 for a name it does not serve. Replies name the model this server hosts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from flask import Blueprint, Response, current_app, g, request

from serve import access_log, adapters, service
from serve.errors import ServeError, UnsupportedMediaType, ValidationError, error_response, openai_error_body
from serve.generation import Finished, GenerationHandle, Token
from serve.json_body import decode_utf8, load_json

# The ready check and helpers are /invocations' own, so both answer alike.
from serve.routes import EVENT_STREAM, JSON_TYPES, caller_gone_check, quoted, ready_predictor
from serve.schemas import ChatRequest, CompletionRequest, GenerationLimits, validate

if TYPE_CHECKING:
    from serve.predictor import Predictor

bp = Blueprint("openai", __name__, url_prefix="/v1")
log = logging.getLogger("serve.openai_routes")

OWNED_BY = "llmft"  # /v1/models' owned_by (vLLM says "vllm")


@bp.get("/models")
def models() -> Response:
    return _json({"object": "list", "data": [_model_card(ready_predictor())]})


@bp.get("/models/<path:model_id>")
def model(model_id: str) -> Response:
    predictor = ready_predictor()
    if model_id != predictor.model_name:
        raise ServeError(f"The model `{model_id}` does not exist.", status=404, error_type="model_not_found")
    return _json(_model_card(predictor))


@bp.post("/chat/completions")
def chat_completions() -> Response:
    return _complete(adapters.OPENAI_CHAT, ChatRequest)


@bp.post("/completions")
def completions() -> Response:
    return _complete(adapters.OPENAI_COMPLETION, CompletionRequest)


def _complete(adapter: adapters.OpenAIAdapter, model: type[ChatRequest] | type[CompletionRequest]) -> Response:
    content_type = request.mimetype or "application/json"
    if content_type not in JSON_TYPES:
        raise UnsupportedMediaType(f"Content-Type {quoted(content_type)} is not supported; send application/json")
    predictor = ready_predictor()
    value = load_json(decode_utf8(request.get_data(cache=False)), where="body")
    if not isinstance(value, dict):
        raise ValidationError("body: expected a JSON object")
    parsed = validate(model, value, GenerationLimits.of(predictor.config))
    jobs = adapter.jobs(parsed, predictor)
    if parsed.stream:
        return _stream(adapter, parsed, jobs, predictor)
    caller_gone = caller_gone_check()
    results = service.run(jobs, predictor, caller_gone=caller_gone)
    g.outcome.record(results)
    if caller_gone is not None and caller_gone():
        return error_response("the client closed the connection; generation cancelled", "cancelled", 499)
    return current_app.response_class(adapter.reply(parsed, jobs, results), mimetype=adapter.media_type)


def _stream(
    adapter: adapters.OpenAIAdapter,
    parsed: ChatRequest | CompletionRequest,
    jobs: list[adapters.Job],
    predictor: Predictor,
) -> Response:
    """All n choices submitted together (429 before the stream if they do not fit), streamed one after the other.
    A failure after the headers is an error frame in OpenAI's shape, then [DONE]."""
    handles = service.submit_all(jobs, predictor)  # errors up to here still get a normal status code
    outcome, started, path = g.outcome, g.started, request.path
    finished: list[Finished] = []

    def events(handle: GenerationHandle) -> Iterator[Token | Finished]:
        for event in handle.events(timeout=predictor.config.result_timeout_s):
            if isinstance(event, Finished):
                finished.append(event)
                outcome.record(finished)
            yield event

    frames = adapter.stream_choices(parsed, jobs, [events(handle) for handle in handles])

    def generate() -> Iterator[str]:
        status = 200
        try:
            yield from frames
        except GeneratorExit:  # the client hung up: free the batch slots
            status = 499
            raise
        except Exception as e:  # headers are gone: report the failure in-band, then end the stream as usual
            log.exception("stream failed after it began")
            status = 500
            yield adapters.sse(openai_error_body(f"generation failed: {e}", "generation", 500))
            yield adapters.sse("[DONE]")
        finally:
            for handle in handles:
                handle.cancel()  # a no-op for those that finished
            access_log.write("POST", path, status, started, outcome, stream=True)

    response = Response(generate(), mimetype=EVENT_STREAM)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _model_card(predictor: Predictor) -> dict:
    return {
        "id": predictor.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": OWNED_BY,
        "max_model_len": predictor.context_length,  # vLLM's extra: the context, in tokens
    }


def _json(payload: dict) -> Response:
    return current_app.response_class(json.dumps(payload, ensure_ascii=False), mimetype="application/json")
