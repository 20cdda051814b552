"""API Gateway stand-in: every path and method goes to one Lambda proxy integration ({proxy+}, ANY).

Order of checks, as in API Gateway: payload limit (413) -> API key (403) -> throttling (429) -> Lambda.
The payload limit holds for bodies without a Content-Length too (chunked): at most limit + 1 bytes are read,
then the 413 goes out; werkzeug's server reads and drops what the client still sends, so a client that
sends its whole body before reading gets the 413, not a broken pipe.
Answers API Gateway itself produces ("gateway responses"), with its bodies:
    403 {"message":"Forbidden"}                 missing or unknown x-api-key (when keys are configured)
    413 {"message":"Request Too Long"}          body over the payload limit (10 MB)
    429 {"message":"Too Many Requests"}         rate/burst exhausted
    502 {"message":"Internal server error"}     function error, timeout inside Lambda, malformed proxy result
    500 {"message":"Internal server error"}     Lambda refused the invoke (e.g. throttled: API Gateway does
                                                not pass Lambda's 429 through)
    504 {"message":"Endpoint request timed out"} no answer within the integration timeout (29 s)
OPTIONS goes to the function like any method (REST proxy + Lambda-handled CORS), without the API key, since
browsers never send custom headers on a preflight.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, Response, request

from apigw_emulator.config import GatewayConfig
from apigw_emulator.events import IncomingRequest, MalformedProxyResult, build_event, parse_result
from apigw_emulator.throttle import Throttle


class IntegrationTimeout(Exception):
    """The function did not answer within the integration timeout."""


class IntegrationFailure(Exception):
    """Lambda could not run the function (throttled, unreachable, ...)."""


@dataclass(frozen=True)
class LambdaReply:
    payload: bytes
    function_error: str | None = None


Invoker = Callable[[bytes], LambdaReply]
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def lambda_invoker(config: GatewayConfig) -> Invoker:
    """Call the function through the real Lambda Invoke API (boto3), as API Gateway's integration does."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

    client = boto3.session.Session().client(
        "lambda",
        endpoint_url=config.lambda_endpoint_url,
        region_name=config.region,
        # The local Lambda emulator checks no signatures; never pick up a developer's real credentials.
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(
            read_timeout=config.integration_timeout_s,
            connect_timeout=2,
            retries={"total_max_attempts": 1},
        ),
    )

    def invoke(event: bytes) -> LambdaReply:
        try:
            response = client.invoke(FunctionName=config.function_name, Payload=event)
        except ReadTimeoutError as e:
            raise IntegrationTimeout() from e
        except (ClientError, BotoCoreError) as e:
            raise IntegrationFailure(str(e)) from e
        return LambdaReply(response["Payload"].read(), response.get("FunctionError"))

    return invoke


def create_app(config: GatewayConfig, invoke: Invoker | None = None, log=None) -> Flask:
    app = Flask("apigw_emulator")
    invoke = invoke or lambda_invoker(config)
    throttle = Throttle(config.throttle_rate, config.throttle_burst)
    log = log or (lambda **fields: print(json.dumps({"logger": "apigw", **fields}), file=sys.stderr, flush=True))

    def gateway_response(status: int, message: str, error_type: str | None = None) -> Response:
        response = Response(json.dumps({"message": message}), status=status, content_type="application/json")
        if error_type:
            response.headers["x-amzn-ErrorType"] = error_type
        if config.gateway_responses_allow_origin:
            # Like DEFAULT_4XX/DEFAULT_5XX gateway responses configured with CORS headers, so that a page on
            # another origin can read 403/429/504 instead of seeing an opaque network error.
            response.headers["Access-Control-Allow-Origin"] = config.gateway_responses_allow_origin
        return response

    @app.get("/_emulator/health")
    def health():
        return {"status": "ok", "payload_format": config.payload_format, "stage": config.stage}

    @app.route("/", defaults={"path": ""}, methods=ALL_METHODS)
    @app.route("/<path:path>", methods=ALL_METHODS)
    def proxy(path: str):
        request_id = str(uuid.uuid4())
        fields = {"request_id": request_id, "method": request.method}
        response = _handle(path, request_id)
        response.headers["x-amzn-RequestId"] = request_id
        log(event="request", status=response.status_code, path="/" + path, **fields)
        return response

    def _handle(path: str, request_id: str) -> Response:
        length = request.content_length
        if length is not None and length > config.max_payload_bytes:
            return gateway_response(413, "Request Too Long")
        body = read_at_most(request.stream, config.max_payload_bytes)
        if body is None:
            return gateway_response(413, "Request Too Long")

        api_key = request.headers.get("x-api-key")
        if config.api_keys and request.method != "OPTIONS" and api_key not in config.api_keys:
            return gateway_response(403, "Forbidden", "ForbiddenException")
        if not throttle.allow(api_key if config.api_keys else None):
            return gateway_response(429, "Too Many Requests", "TooManyRequestsException")

        event = build_event(
            IncomingRequest(
                method=request.method,
                path=_strip_stage("/" + path, config.stage),
                raw_query=request.query_string.decode("latin-1"),
                query=list(request.args.items(multi=True)),
                headers=list(request.headers.items()),
                body=body,
                source_ip=request.remote_addr or "127.0.0.1",
                host=request.host,
                api_key=api_key if config.api_keys else None,
            ),
            version=config.payload_format,
            stage=config.stage,
            binary_media_types=config.binary_media_types,
            request_id=request_id,  # the same id in requestContext.requestId and x-amzn-RequestId
        )
        try:
            reply = invoke(json.dumps(event).encode())
        except IntegrationTimeout:
            return gateway_response(504, "Endpoint request timed out")
        except IntegrationFailure as e:
            log(event="integration_failure", error=str(e))
            return gateway_response(500, "Internal server error")
        if reply.function_error:
            log(event="function_error", error=reply.payload[:500].decode("utf-8", "replace"))
            return gateway_response(502, "Internal server error")
        try:
            result = parse_result(reply.payload, version=config.payload_format)
        except MalformedProxyResult as e:
            log(event="malformed_lambda_proxy_response", error=str(e))
            return gateway_response(502, "Internal server error")
        response = Response(result.body, status=result.status)
        response.headers.clear()
        for name, value in result.headers:
            response.headers.add(name, value)
        return response

    return app


def read_at_most(stream, limit: int) -> bytes | None:
    """The request body, or None once it is longer than `limit`: never more than limit + 1 bytes in memory,
    whatever the client declared (or did not: a chunked body has no Content-Length)."""
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(1 << 16, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    return None


def _strip_stage(path: str, stage: str) -> str:
    """/prod/ask -> /ask: execute-api URLs carry the stage; custom-domain style URLs without it work too."""
    prefix = f"/{stage}"
    if stage != "$default" and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix) :] or "/"
    return path
