"""The SageMaker hosting routes: GET /ping, POST /invocations, GET /execution-parameters. Thin by design."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, request

from serve import service
from serve.errors import (
    BadRequest,
    NotAcceptable,
    NotReady,
    ServeError,
    UnsupportedMediaType,
    ValidationError,
    error_body,
    error_response,
)
from serve.predictor import Predictor
from serve.schemas import ChatRequest, parse_request

bp = Blueprint("serve", __name__)
access_log = logging.getLogger("serve.access")
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
        json.dumps(service.execution_parameters(_predictor().config)), mimetype="application/json"
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
    if content_type in JSONLINES_TYPES:
        return _jsonlines(body, predictor)

    parsed = parse_request(_load_json(body, where="body"), max_new_tokens_cap=predictor.config.max_new_tokens_cap)
    if parsed.stream:
        _negotiate([EVENT_STREAM, "application/json"], produce=EVENT_STREAM)
        return _stream(parsed, predictor)
    _negotiate(["application/json"])
    jobs = service.plan(parsed, predictor)
    results = service.wait_all(service.submit_all(jobs, predictor), predictor)
    service.record(g.outcome, results)
    if isinstance(parsed, ChatRequest):
        payload: object = service.chat_reply(parsed, results[0], predictor.model_name)
    else:
        payload = service.tgi_reply(jobs, results)
    return current_app.response_class(json.dumps(payload, ensure_ascii=False), mimetype="application/json")


def _jsonlines(body: bytes, predictor: Predictor) -> Response:
    """Batch transform: one request per line in, one reply per line out, in order."""
    _negotiate(sorted(JSONLINES_TYPES), produce="application/jsonlines")
    lines = [line for line in _decode(body).splitlines() if line.strip()]
    requests, plans = [], []
    for number, line in enumerate(lines, start=1):
        try:
            parsed = parse_request(
                _load_json(line.encode(), where=f"line {number}"),
                max_new_tokens_cap=predictor.config.max_new_tokens_cap,
            )
            if parsed.stream:
                raise ValidationError("stream: not available for application/jsonlines bodies")
            plans.append(service.plan(parsed, predictor))
        except ServeError as e:
            if not e.message.startswith("line "):
                e.message = f"line {number}: {e.message}"
            raise
        requests.append(parsed)
    all_jobs = [job for jobs in plans for job in jobs]
    results = iter(service.wait_all(service.submit_all(all_jobs, predictor), predictor))
    out, collected = [], []
    for parsed, jobs in zip(requests, plans, strict=True):
        mine = [next(results) for _ in jobs]
        collected.extend(mine)
        if isinstance(parsed, ChatRequest):
            out.append(service.chat_reply(parsed, mine[0], predictor.model_name))
        else:
            out.append(service.tgi_reply(jobs, mine))
    service.record(g.outcome, collected)
    text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in out)
    return current_app.response_class(text, mimetype="application/jsonlines")


def _stream(parsed, predictor: Predictor) -> Response:
    jobs = service.plan(parsed, predictor)
    handle = service.submit_all(jobs, predictor)[0]  # errors up to here still get a normal status code
    outcome, started, path = g.outcome, g.started, request.path
    if isinstance(parsed, ChatRequest):
        frames = service.chat_stream(parsed, handle, predictor, outcome)
    else:
        frames = service.tgi_stream(jobs[0], handle, predictor, outcome)

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
            yield service.sse(error_body(f"generation failed: {e}", "generation"))
        finally:
            log_access("POST", path, status, started, outcome, stream=True)

    response = Response(generate(), mimetype=EVENT_STREAM)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    g.stream_logged_later = True
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


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"body is not UTF-8: {e}") from None


def _load_json(body: bytes, *, where: str) -> object:
    text = _decode(body)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"{where} is not valid JSON: {e}") from None
    except RecursionError:  # json.loads recurses per nesting level; a request is never this deep
        raise BadRequest(f"{where}: JSON is nested too deeply") from None
    except ValueError:  # an integer over Python's 4300-digit conversion limit
        raise BadRequest(f"{where}: a number in the JSON has too many digits") from None
    if _LONE_SURROGATE_ESCAPE.search(text):
        _reject_lone_surrogates(value, where)
    return value


# `\ud800`-style escapes decode to lone UTF-16 surrogates: valid JSON, but not text a tokenizer accepts.
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_lone_surrogates(value: object, where: str) -> None:
    """Escaped surrogate *pairs* decode to one character and pass; a lone one cannot be encoded as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"{where} holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without its pair); send valid Unicode text"
        ) from None


def log_access(
    method: str, path: str, status: int, started: float, outcome: service.Outcome, *, stream: bool = False
) -> None:
    """One JSON line per request; never the user's text."""
    latency = time.monotonic() - started
    record = {
        "method": method,
        "path": path,
        "status": status,
        "latency_ms": round(latency * 1000, 1),
        "prompt_tokens": outcome.prompt_tokens,
        "generated_tokens": outcome.generated_tokens,
        "tokens_per_s": round(outcome.generated_tokens / latency, 1) if latency > 0 else None,
    }
    if outcome.finish_reason:
        record["finish_reason"] = outcome.finish_reason
    if stream:
        record["stream"] = True
    access_log.info(json.dumps(record))
