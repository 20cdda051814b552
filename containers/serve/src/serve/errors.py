"""One error shape for every failure: {"error": <message>, "error_type": <kind>} with the right status.

The same shape TGI uses, so clients written for TGI endpoints read our errors unchanged. The OpenAI-compatible
routes (/v1/..., serve.openai_routes) answer the same errors in OpenAI's shape instead, which OpenAI's clients
read: {"error": {"message", "type", "param", "code"}} (see openai_error_body).
"""

from __future__ import annotations

import re

from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException


class ServeError(Exception):
    """An error with its HTTP status and a short machine-readable kind."""

    status = 500
    error_type = "internal"

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type


class BadRequest(ServeError):
    status, error_type = 400, "bad_request"


class UnsupportedMediaType(ServeError):
    status, error_type = 415, "unsupported_media_type"


class NotAcceptable(ServeError):
    status, error_type = 406, "not_acceptable"


class ValidationError(ServeError):
    status, error_type = 422, "validation"


class Overloaded(ServeError):
    status, error_type = 429, "overloaded"


class NotReady(ServeError):
    status, error_type = 503, "not_ready"


class QueueExpired(ServeError):
    """Waited in the queue past its deadline and never started: retry later (503, as SageMaker retries it)."""

    status, error_type = 503, "queue_timeout"


class GenerationFailed(ServeError):
    status, error_type = 424, "generation"


# werkzeug's own errors (404, 405, 413 ...) keep their status; only the body shape changes.
_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_body(message: str, error_type: str) -> dict:
    return {"error": message, "error_type": error_type}


def error_response(message: str, error_type: str, status: int) -> Response:
    if request and request.path.startswith(OPENAI_PREFIX):
        return openai_error_response(message, error_type, status)
    return Response(json.dumps(error_body(message, error_type)), status=status, mimetype="application/json")


# ----- OpenAI's shape, for the /v1 routes only -----

OPENAI_PREFIX = "/v1/"
# A message that starts with a field path (`messages.0.role: ...`, `body: n: ...` from a rule across fields) names
# OpenAI's `param`.
_PARAM = re.compile(r"^(?:body: )?([A-Za-z_][\w.]*): ")


def openai_status(status: int) -> int:
    """OpenAI and vLLM answer a bad field with 400 where /invocations (like TGI) says 422."""
    return 400 if status == 422 else status


def openai_error_body(message: str, error_type: str, status: int) -> dict:
    """OpenAI's error object: `type` is OpenAI's class of error, `code` our error_type (validation, overloaded,
    not_ready ...), `param` the field the message names, if any."""
    if status == 429:
        kind = "rate_limit_error"
    elif status >= 500 or error_type == "generation":
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    field = _PARAM.match(message)
    param = field.group(1) if field and field.group(1) != "body" else None
    return {"error": {"message": message, "type": kind, "param": param, "code": error_type}}


def openai_error_response(message: str, error_type: str, status: int) -> Response:
    status = openai_status(status)
    return Response(
        json.dumps(openai_error_body(message, error_type, status)), status=status, mimetype="application/json"
    )


# A refused body is read and dropped, up to this many times the limit, before the 413 goes out: a client that
# sends its whole body before reading (Python's urllib, most scripts) would otherwise get a broken pipe instead
# of the reply. Beyond that, the connection is closed as before.
DRAIN_LIMIT_FACTOR = 4


DRAIN_IDLE_S = 2.0  # and no longer than the body keeps arriving: a client that stalls gets its 413 after this


def _drain_body(request, most: int) -> None:
    stream = request.environ.get("wsgi.input")
    sock = request.environ.get("gunicorn.socket")
    if stream is None:
        return
    previous = sock.gettimeout() if sock is not None else None
    try:
        if sock is not None:
            sock.settimeout(DRAIN_IDLE_S)
        while most > 0:
            chunk = stream.read(min(1 << 16, most))
            if not chunk:
                return
            most -= len(chunk)
    except OSError:  # stalled (timeout) or gone: answer now
        return
    finally:
        if sock is not None:
            sock.settimeout(previous)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ServeError)
    def _serve_error(e: ServeError):
        return error_response(e.message, e.error_type, e.status)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        message = e.description or e.name
        if e.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"request body is larger than the {limit} byte limit (SAGEMAKER_MAX_PAYLOAD_IN_MB)"
            _drain_body(request, (limit or 0) * DRAIN_LIMIT_FACTOR)
        return error_response(message, _HTTP_ERROR_TYPES.get(e.code or 500, "http_error"), e.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        app.logger.exception("unhandled error")
        return error_response(f"internal error: {type(e).__name__}", "internal", 500)
