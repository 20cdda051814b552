"""Lambda entry point `qa_function.handler.handler`: the only module that knows API Gateway's event shape.

Routes (any stage prefix is ignored, so /prod/ask and /ask both work):
    POST    /ask   {"question": str, "parameters": {...}?, "target_variant": str?, "retrieval": bool?}
            -> 200 {"answer", "variant", "latency_ms", "sources"?} | 4xx/5xx {"error", "error_type", "request_id"}
    OPTIONS *      CORS preflight, answered from CORS_ALLOW_ORIGINS
Both REST API (payload v1) and HTTP API (payload v2) proxy events are accepted.

No streaming route: API Gateway HTTP APIs buffer Lambda responses, REST APIs stream only from functions
that use Lambda response streaming, which the managed Python runtime does not offer (docs/lambda-and-web.md).

Logs are one JSON object per line on stdout (CloudWatch keeps them per request); they carry sizes,
statuses, timings and ids, never the question or the answer.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from qa_function import sagemaker
from qa_function.config import FunctionConfig
from qa_function.logic import (
    ALLOWED_METHODS,
    RequestError,
    UpstreamError,
    attempt_read_timeout,
    cors_headers,
    error_body,
    parse_ask_request,
    success_body,
)

ASK_PATH = "/ask"


@dataclass(frozen=True)
class HttpRequest:
    """What the function needs from either payload version."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    api_request_id: str | None
    payload_version: str


@dataclass
class Runtime:
    """Built once per cold start, on the first invocation (nothing is done at import time)."""

    config: FunctionConfig
    client: Any
    invocations: int = 0


_runtime: Runtime | None = None


def get_runtime(context: Any) -> Runtime:
    global _runtime
    if _runtime is None:
        config = FunctionConfig.from_env(os.environ)
        remaining_s = context.get_remaining_time_in_millis() / 1000 if context is not None else 30.0
        read_timeout_s = attempt_read_timeout(remaining_s, config)
        _runtime = Runtime(config=config, client=sagemaker.make_client(config, read_timeout_s))
        log(
            "cold_start",
            endpoint_name=config.endpoint_name,
            read_timeout_s=round(read_timeout_s, 2),
            max_attempts=config.max_attempts,
            cors_allow_origins=list(config.cors_allow_origins),
        )
    return _runtime


def reset_cold_start() -> None:
    """Forget the cached config and client (tests; a real cold start does this by starting a new process)."""
    global _runtime
    _runtime = None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    started = time.perf_counter()
    runtime = get_runtime(context)
    runtime.invocations += 1
    config = runtime.config
    aws_request_id = getattr(context, "aws_request_id", None)
    fields: dict[str, Any] = {"aws_request_id": aws_request_id, "cold_start": runtime.invocations == 1}

    try:
        request = parse_event(event)
    except RequestError as e:
        response = _error_response(e.status, e.error_type, e.message, {}, aws_request_id)
        log("request", status=e.status, error_type=e.error_type, **fields)
        return response

    origin = request.headers.get("origin")
    fields.update(
        method=request.method,
        path=request.path,
        payload_version=request.payload_version,
        api_request_id=request.api_request_id,
        body_bytes=len(request.body),
    )
    try:
        if request.method == "OPTIONS":
            response = _preflight(origin, config, aws_request_id)
        elif request.path.rstrip("/").endswith(ASK_PATH):
            if request.method != "POST":
                raise RequestError(405, "MethodNotAllowed", f"{request.method} is not allowed on {ASK_PATH}; use POST")
            ask = parse_ask_request(request.body, config)
            fields.update(question_chars=len(ask.question), parameters=sorted(ask.parameters), retrieval=ask.retrieval)
            answer = sagemaker.invoke(runtime.client, config, ask)
            fields.update(
                variant=answer.variant,
                model_latency_ms=round(answer.latency_ms, 1),
                finish_reason=answer.finish_reason,
                sources=None if answer.sources is None else len(answer.sources),
                sources_dropped=answer.sources_dropped,
            )
            response = _json_response(200, success_body(answer), cors_headers(origin, config))
        else:
            raise RequestError(404, "NotFound", f"No route for {request.method} {request.path}; use POST {ASK_PATH}")
    except (RequestError, UpstreamError) as e:
        fields.update(error_type=e.error_type)
        response = _error_response(e.status, e.error_type, e.message, cors_headers(origin, config), aws_request_id)
        if e.status == 405:
            response["headers"]["Allow"] = ALLOWED_METHODS
    except Exception as e:  # the one catch-all: the caller gets one JSON error shape, the log gets the type
        fields.update(error_type="InternalError", exception=type(e).__name__)
        response = _error_response(
            500,
            "InternalError",
            "The function failed unexpectedly",
            cors_headers(origin, config),
            aws_request_id,
        )

    log(
        "request",
        level="ERROR" if response["statusCode"] >= 500 else "INFO",
        status=response["statusCode"],
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
        **fields,
    )
    return response


def parse_event(event: dict[str, Any]) -> HttpRequest:
    """API Gateway proxy event (REST v1 or HTTP API v2) -> HttpRequest; base64 bodies are decoded."""
    if not isinstance(event, dict):
        raise RequestError(400, "BadRequest", "The function expects an API Gateway proxy event")
    context = _mapping(event.get("requestContext"))
    headers = {k.lower(): v for k, v in _mapping(event.get("headers")).items() if isinstance(v, str)}
    if event.get("version") == "2.0":
        http = _mapping(context.get("http"))
        method, path = http.get("method"), event.get("rawPath") or http.get("path")
        version = "2.0"
    else:
        method, path = event.get("httpMethod"), event.get("path")
        # multiValueHeaders holds every value; headers only the last. Join like HTTP does.
        for k, values in _mapping(event.get("multiValueHeaders")).items():
            if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
                headers[k.lower()] = ", ".join(values)
        version = "1.0"
    if not isinstance(method, str) or not isinstance(path, str) or not method or not path:
        raise RequestError(400, "BadRequest", "The function expects an API Gateway proxy event")

    raw_body = event.get("body") or ""
    if not isinstance(raw_body, str):
        raise RequestError(400, "BadRequest", "The function expects an API Gateway proxy event")
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(raw_body, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, "BadRequest", "Request body is marked base64 but does not decode") from e
    else:
        body = raw_body.encode("utf-8")
    return HttpRequest(
        method=method.upper(),
        path=path,
        headers=headers,
        body=body,
        api_request_id=context.get("requestId"),
        payload_version=version,
    )


def _mapping(value: Any) -> dict[str, Any]:
    """A proxy-event member that should be an object; anything else (null, a list, a string) counts as empty."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _preflight(origin: str | None, config: FunctionConfig, request_id: str | None) -> dict[str, Any]:
    headers = cors_headers(origin, config, preflight=True)
    if origin and not headers:
        return _error_response(
            403, "CorsOriginNotAllowed", f"Origin {origin} is not in CORS_ALLOW_ORIGINS", {}, request_id
        )
    return {"statusCode": 204, "headers": {"Allow": ALLOWED_METHODS, **headers}, "body": ""}


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json", "Cache-Control": "no-store", **headers},
        "body": json.dumps(body),
        "isBase64Encoded": False,
    }


def _error_response(
    status: int, error_type: str, message: str, headers: dict[str, str], request_id: str | None
) -> dict[str, Any]:
    return _json_response(status, error_body(error_type, message, request_id), headers)


def log(event: str, level: str = "INFO", **fields: Any) -> None:
    """One JSON line per event. Callers pass sizes and ids only; user text never reaches this function."""
    record = {"level": level, "event": event, "logger": "qa_function", **fields}
    print(json.dumps(record, default=str), file=sys.stdout, flush=True)
