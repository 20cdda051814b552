"""The SageMaker hosting routes: GET /ping, POST /invocations, GET /execution-parameters. Thin by design."""

from __future__ import annotations

import json
import logging
import select
import socket
from collections.abc import Callable, Iterator
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


def ready_predictor() -> Predictor:
    predictor = _predictor()
    if predictor.state == "loading":
        raise NotReady("the model is still loading; retry when GET /ping answers 200")
    if predictor.state == "failed":
        raise NotReady(f"the model failed to load: {predictor.reason}", error_type="unhealthy")
    if not predictor.engine.alive:
        raise NotReady(predictor.health() or "the generation engine is not running", error_type="unhealthy")
    return predictor


@bp.get("/ping")
def ping() -> Response:
    predictor = _predictor()
    problem = predictor.health()
    if problem is None:
        # This worker serves; with several workers, any one answers for the whole server (serve.readiness).
        board = current_app.extensions.get("serve.ready_board")
        server = board.problem() if board is not None else None
        if server is None:
            return Response(status=200)
        return error_response(server.message, server.error_type, 503)
    if predictor.state == "loading":
        return error_response(problem, "not_ready", 503)
    # Failed to load, or the engine can no longer generate: SageMaker replaces an instance that stays 503.
    return error_response(problem, "unhealthy", 503)


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
            f"Content-Type {quoted(content_type)} is not supported; send application/json "
            "(one request) or application/jsonlines (one request per line)"
        )
    predictor = ready_predictor()
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
    caller_gone = caller_gone_check()
    window = adapters.records_in_flight(predictor.config) if adapter is adapters.JSON_LINES else None
    results = service.run(jobs, predictor, caller_gone=caller_gone, window=window)
    g.outcome.record(results)
    if caller_gone is not None and caller_gone():
        # Nobody reads this reply; the status is for the access log (nginx's "client closed request").
        return error_response("the client closed the connection; generation cancelled", "cancelled", 499)
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


def caller_gone_check() -> Callable[[], bool] | None:
    """A check that the client has closed its connection (gunicorn hands the worker its socket; other servers,
    such as Flask's test client, have none to look at)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return None

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            # Readable with nothing to read is the peer's close; bytes waiting (a pipelined request) are not.
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    return gone


def _negotiate(offers: list[str], produce: str | None = None) -> str:
    if not request.headers.get("Accept"):
        return produce or offers[0]
    best = request.accept_mimetypes.best_match(offers)
    if best is None:
        raise NotAcceptable(
            f"cannot produce any of Accept: {quoted(request.headers.get('Accept'))}; this request "
            f"is answered as {produce or offers[0]}"
        )
    return best


def quoted(header: str | None, limit: int = 100) -> str:
    """A caller's header value for an error message, cut short: errors must not echo kilobytes back."""
    text = repr(header)
    return text if len(text) <= limit else text[:limit] + "...(cut)"
