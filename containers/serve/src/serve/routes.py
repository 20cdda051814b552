"""The SageMaker hosting routes: GET /ping, POST /invocations, GET /execution-parameters. Thin by design."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, g, request

from serve import access_log, adapters, service
from serve.errors import NotAcceptable, NotReady, UnsupportedMediaType, error_body, error_response
from serve.schemas import GenerationLimits

if TYPE_CHECKING:
    from serve.predictor import Predictor

bp = Blueprint("serve", __name__)
log = logging.getLogger("serve.routes")

JSON_TYPES = {"application/json"}
JSONLINES_TYPES = {
    "application/jsonlines",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-lines",
}
EVENT_STREAM = "text/event-stream"


def _predictor() -> Predictor:
    return current_app.extensions["serve.predictor"]


def _ready_predictor() -> Predictor:
    predictor = _predictor()
    if predictor.state == "loading":
        raise NotReady("the model is still loading; retry when GET /ping answers 200")
    if predictor.state == "failed":
        raise NotReady(f"the model failed to load: {predictor.reason}", error_type="unhealthy")
    return predictor


@bp.get("/ping")
def ping() -> Response:
    predictor = _predictor()
    if predictor.ready:
        return Response(status=200)
    if predictor.state == "failed":
        return error_response(f"the model failed to load: {predictor.reason}", "unhealthy", 503)
    return error_response("the model is loading", "not_ready", 503)


@bp.get("/execution-parameters")
def execution_parameters() -> Response:
    return current_app.response_class(
        json.dumps(adapters.execution_parameters(_predictor().config)), mimetype="application/json"
    )


@bp.post("/invocations")
def invocations() -> Response:
    content_type = request.mimetype or "application/json"  # SageMaker callers often omit it
    if content_type not in JSON_TYPES | JSONLINES_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {_quoted(content_type)} is not supported; send application/json "
            "(one request) or application/jsonlines (one request per line)"
        )
    predictor = _ready_predictor()
    body = request.get_data(cache=False)  # over SAGEMAKER_MAX_PAYLOAD_IN_MB -> 413 from werkzeug
    limits = GenerationLimits.of(predictor.config)
    if content_type in JSONLINES_TYPES:
        # Batch transform: the answer is JSON Lines whatever the lines hold, so Accept is checked first.
        _negotiate(sorted(JSONLINES_TYPES), produce=adapters.JSONLINES)
        adapter, parsed = adapters.JSON_LINES, adapters.JSON_LINES.parse(body, limits)
    else:
        adapter, parsed = adapters.parse_json(body, limits)
        if parsed.stream:
            _negotiate([EVENT_STREAM, "application/json"], produce=EVENT_STREAM)
            return _stream(adapter, parsed, predictor)
        _negotiate(["application/json"])
    jobs = adapter.plan(parsed, predictor)
    results = service.run(jobs, predictor)
    g.outcome.record(results)
    return current_app.response_class(adapter.reply(parsed, jobs, results), mimetype=adapter.media_type)


def _stream(adapter: adapters.Adapter, parsed: Any, predictor: Predictor) -> Response:
    jobs = adapter.plan(parsed, predictor)
    handle = service.submit_all(jobs, predictor)[0]  # errors up to here still get a normal status code
    outcome, started, path = g.outcome, g.started, request.path
    frames = adapter.stream(parsed, jobs, service.events(handle, predictor, outcome))

    def generate() -> Iterator[str]:
        status = 200
        try:
            yield from frames
        except GeneratorExit:  # the client hung up: free the batch slot
            handle.cancel()
            status = 499
            raise
        except Exception as e:  # headers are gone: report the failure in-band
            log.exception("stream failed after it began")
            handle.cancel()
            status = 500
            yield adapters.sse(error_body(f"generation failed: {e}", "generation"))
        finally:  # a stream is logged here, when its status is known, not by access_log's after_request
            access_log.write("POST", path, status, started, outcome, stream=True)

    response = Response(generate(), mimetype=EVENT_STREAM)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _negotiate(offers: list[str], produce: str | None = None) -> str:
    if not request.headers.get("Accept"):
        return produce or offers[0]
    best = request.accept_mimetypes.best_match(offers)
    if best is None:
        raise NotAcceptable(
            f"cannot produce any of Accept: {_quoted(request.headers.get('Accept'))}; this request "
            f"is answered as {produce or offers[0]}"
        )
    return best


def _quoted(header: str | None, limit: int = 100) -> str:
    """A caller's header value for an error message, cut short: errors must not echo kilobytes back."""
    text = repr(header)
    return text if len(text) <= limit else text[:limit] + "...(cut)"
