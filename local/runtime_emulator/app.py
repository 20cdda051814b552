"""The SageMaker Runtime REST API in front of local serving containers, as an aiohttp application.

Why aiohttp: the emulator is pure I/O (read a request, forward it, relay bytes back). One asyncio loop
relays many concurrent token streams without a thread or worker per stream, its server and client
both write each chunk as soon as it is produced (TCP_NODELAY, no response buffering), and one pooled
keep-alive client session keeps the added latency to a fraction of a millisecond.

Routes (same paths and headers as runtime.sagemaker.<region>.amazonaws.com):
    POST /endpoints/{name}/invocations                  InvokeEndpoint
    POST /endpoints/{name}/invocations-response-stream  InvokeEndpointWithResponseStream
    GET  /ping                                          the emulator's own health (for compose)
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from . import eventstream
from .config import EmulatorConfig, Endpoint, Variant
from .errors import (
    RuntimeApiError,
    internal_failure,
    model_error,
    model_not_ready,
    validation_error,
)
from .routing import pick_variant

log = logging.getLogger("runtime_emulator")

# Request headers SageMaker passes on to the container; it strips every other header.
FORWARDED_REQUEST_HEADERS = (
    "Content-Type",
    "X-Amzn-SageMaker-Custom-Attributes",
    "X-Amzn-SageMaker-Target-Model",
    "X-Amzn-SageMaker-Inference-Id",
    "X-Amzn-SageMaker-Session-Id",
    "X-Amzn-SageMaker-Enable-Explanations",
    "X-Amzn-SageMaker-Inference-Component",
)
# Container response headers that the runtime API hands back to the caller.
RETURNED_RESPONSE_HEADERS = (
    "X-Amzn-SageMaker-Custom-Attributes",
    "X-Amzn-SageMaker-New-Session-Id",
    "X-Amzn-SageMaker-Closed-Session-Id",
)
VARIANT_HEADER = "x-Amzn-Invoked-Production-Variant"
REQUEST_ID_HEADER = "x-amzn-RequestId"
EVENTSTREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"
# Name of the container in error messages; AWS says "primary" for a variant's single container.
CONTAINER_NAME = "primary"
# Container error bodies are quoted back to the caller; keep a runaway HTML page from flooding it.
MAX_QUOTED_ERROR_CHARS = 4096

CONFIG_KEY = web.AppKey("config", EmulatorConfig)
RNG_KEY = web.AppKey("rng", random.Random)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
HEALTH_KEY = web.AppKey("health", dict)


@dataclass
class VariantHealth:
    """What the emulator has seen of one container: has it ever answered (ping or invocation)?"""

    ever_ready: bool = False
    last_error: str | None = None


@dataclass
class Invocation:
    """What one request log line says; filled in as the request goes."""

    operation: str
    request_id: str
    endpoint: str
    started: float
    variant: str | None = None
    status: int = 200
    error: str | None = None
    container_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    parts: int = 0
    first_part_ms: float | None = None

    def log(self) -> None:
        fields = {k: v for k, v in self.__dict__.items() if v is not None and k != "started"}
        fields["latency_ms"] = round((time.perf_counter() - self.started) * 1000, 2)
        failed = self.status >= 500 or self.status == 424 or (self.error or "").startswith("Model")
        level = logging.WARNING if failed else logging.INFO
        log.log(level, "invocation", extra=fields)


def create_app(config: EmulatorConfig, rng: random.Random | None = None) -> web.Application:
    """Build the emulator; `rng` makes the traffic split reproducible in tests."""
    # Bodies are read by _read_body, never by request.read(); client_max_size is set to the limit all the same.
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_internal_failure])
    app[CONFIG_KEY] = config
    app[RNG_KEY] = rng or random.Random(config.routing_seed)
    app[HEALTH_KEY] = {}
    app.cleanup_ctx.append(_client_session)
    app.router.add_get("/ping", ping)
    app.router.add_post("/endpoints/{endpoint}/invocations", invoke_endpoint)
    app.router.add_post("/endpoints/{endpoint}/invocations-response-stream", invoke_endpoint_stream)
    app.router.add_post("/endpoints/{endpoint}/async-invocations", not_emulated)
    app.router.add_route("*", "/{tail:.*}", unknown_operation)
    return app


@web.middleware
async def _internal_failure(request: web.Request, handler) -> web.StreamResponse:
    """Anything unexpected still answers in the API's error shape (InternalFailure, 500)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        exc = internal_failure("The local endpoint emulator failed; see its log.")
        return web.json_response(exc.body(), status=exc.status, headers={"x-amzn-ErrorType": exc.code})


async def _client_session(app: web.Application):
    # Idle keep-alive connections are dropped after 1 s, before the container drops them (gunicorn's
    # default keepalive is 2 s): aiohttp does not retry a POST on a connection the server just closed,
    # and that race would surface as a spurious ModelError.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=1.0)
    # No Accept-Encoding: a compressing container would hold tokens back; no User-Agent: not ours to add.
    # No cookie jar: one caller's cookies from a container must never ride along on another's request.
    async with aiohttp.ClientSession(
        connector=connector,
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        app[SESSION_KEY] = session
        yield


# ---------------------------------------------------------------------------------------------- routes


async def ping(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    health = request.app[HEALTH_KEY]
    endpoints = {
        name: {
            v.name: {"url": v.url, "weight": v.weight, "ready": health.get(v.url, VariantHealth()).ever_ready}
            for v in ep.variants
        }
        for name, ep in config.endpoints.items()
    }
    return web.json_response({"status": "ok", "endpoints": endpoints})


async def invoke_endpoint(request: web.Request) -> web.StreamResponse:
    return await _invoke(request, "InvokeEndpoint", _forward)


async def invoke_endpoint_stream(request: web.Request) -> web.StreamResponse:
    return await _invoke(request, "InvokeEndpointWithResponseStream", _forward_stream)


async def _invoke(request: web.Request, api: str, forward) -> web.StreamResponse:
    """Validate, pick the variant (TargetVariant or weighted), forward; the two invoke APIs differ only in
    how the container's answer travels back."""
    call = _start(request, api)
    try:
        endpoint, body = await _validated_request(request, call)
        variant = pick_variant(endpoint, request.app[RNG_KEY], request.headers.get("X-Amzn-SageMaker-Target-Variant"))
        call.variant = variant.name
        return await forward(request, call, endpoint, variant, body)
    except RuntimeApiError as exc:
        return _error_response(call, exc)
    finally:
        call.log()


async def not_emulated(request: web.Request) -> web.Response:
    call = _start(request, "InvokeEndpointAsync")
    try:
        return _error_response(
            call,
            validation_error("InvokeEndpointAsync is not emulated locally; use InvokeEndpoint or the stream."),
        )
    finally:
        call.log()


async def unknown_operation(request: web.Request) -> web.Response:
    exc = RuntimeApiError(
        "UnknownOperationException",
        404,
        f"{request.method} {request.path} is not a SageMaker Runtime operation.",
    )
    return web.json_response(exc.body(), status=exc.status, headers={"x-amzn-ErrorType": exc.code})


# ------------------------------------------------------------------------------------------- internals


def _start(request: web.Request, operation: str) -> Invocation:
    return Invocation(
        operation=operation,
        request_id=str(uuid.uuid4()),
        endpoint=request.match_info.get("endpoint", ""),
        started=time.perf_counter(),
    )


def _error_response(call: Invocation, exc: RuntimeApiError) -> web.Response:
    call.status, call.error = exc.status, exc.code
    return web.json_response(
        exc.body(),
        status=exc.status,
        headers={"x-amzn-ErrorType": exc.code, REQUEST_ID_HEADER: call.request_id},
    )


async def _validated_request(request: web.Request, call: Invocation) -> tuple[Endpoint, bytes]:
    config = request.app[CONFIG_KEY]
    body = await _read_body(request, config.max_body_bytes, call)
    endpoint = config.endpoints.get(call.endpoint)
    if endpoint is None:
        raise validation_error(f"Endpoint {call.endpoint} of account {config.account_id} not found.")
    return endpoint, body


async def _read_body(request: web.Request, limit: int, call: Invocation) -> bytes:
    """Read the body, rejecting more than `limit` bytes before anything reaches a container. The error goes
    out as soon as the limit is passed (or at once when the declared length is over it); aiohttp then reads and
    drops what the client still sends for up to its lingering time (10 s), so a client that sends its whole
    body before reading gets the error, not a broken pipe, and a client that stalls is let go after 10 s."""
    declared = request.content_length
    chunks, size = [], 0
    if declared is None or declared <= limit:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
    call.bytes_in = size
    if size > limit or (declared is not None and declared > limit):
        length = f"{declared} bytes" if declared is not None else f"more than {limit} bytes"
        raise validation_error(f"Request {call.request_id} has oversize body: {length}; the limit is {limit} bytes.")
    return b"".join(chunks)


def _container_headers(request: web.Request, accept: str | None) -> dict[str, str]:
    headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
    if accept:
        headers["Accept"] = accept
    return headers


def _returned_headers(call: Invocation, variant: Variant, upstream: aiohttp.ClientResponse) -> dict[str, str]:
    headers = {VARIANT_HEADER: variant.name, REQUEST_ID_HEADER: call.request_id}
    for name in RETURNED_RESPONSE_HEADERS:
        if name in upstream.headers:
            headers[name] = upstream.headers[name]
    return headers


def _health(request: web.Request, variant: Variant) -> VariantHealth:
    return request.app[HEALTH_KEY].setdefault(variant.url, VariantHealth())


async def _ensure_ready(request: web.Request, endpoint: Endpoint, variant: Variant) -> None:
    """Until a container has answered once, check /ping first: a container still loading its model
    gives the retryable ModelNotReadyException instead of a ModelError. Afterwards this costs nothing."""
    health = _health(request, variant)
    if health.ever_ready:
        return
    config = request.app[CONFIG_KEY]
    try:
        async with request.app[SESSION_KEY].get(
            variant.ping_url, timeout=aiohttp.ClientTimeout(total=config.ping_timeout_s)
        ) as resp:
            await resp.read()
            if resp.status == 200:
                health.ever_ready, health.last_error = True, None
                return
            health.last_error = f"/ping answered {resp.status}"
    except TimeoutError:
        health.last_error = f"/ping did not answer within {config.ping_timeout_s:g} s"
    except aiohttp.ClientError as exc:
        health.last_error = f"/ping failed: {_describe(exc)}"
    raise model_not_ready(
        f"Variant {variant.name} of endpoint {endpoint.name} is not ready yet: its container at "
        f"{variant.url} has not passed a health check ({health.last_error}). Wait and try again."
    )


def _model_error(request: web.Request, endpoint: Endpoint, variant: Variant, status: int | None, text: str):
    config = request.app[CONFIG_KEY]
    return model_error(
        original_status=status,
        original_message=text,
        container=CONTAINER_NAME,
        endpoint=endpoint.name,
        region=config.region,
        account_id=config.account_id,
        variant=variant.name,
    )


def _timeout_error(request, endpoint, variant) -> RuntimeApiError:
    return _model_error(
        request,
        endpoint,
        variant,
        None,
        f"Your invocation timed out while waiting for a response from container {CONTAINER_NAME}. "
        f"The container must answer within {request.app[CONFIG_KEY].invocation_timeout_s:g} s.",
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    return str(exc) or type(exc).__name__


def _connection_error(request, endpoint, variant, exc: aiohttp.ClientError) -> RuntimeApiError:
    detail = _describe(exc)
    _health(request, variant).last_error = detail
    return _model_error(
        request, endpoint, variant, None, f"The container at {variant.url} could not be reached: {detail}"
    )


async def _upstream_error(
    request, call: Invocation, endpoint, variant, upstream: aiohttp.ClientResponse
) -> RuntimeApiError:
    call.container_status = upstream.status
    raw = await upstream.content.read(MAX_QUOTED_ERROR_CHARS * 4)
    text = raw.decode("utf-8", errors="replace")[:MAX_QUOTED_ERROR_CHARS]
    return _model_error(request, endpoint, variant, upstream.status, text)


async def _forward(request, call: Invocation, endpoint: Endpoint, variant: Variant, body: bytes):
    config = request.app[CONFIG_KEY]
    await _ensure_ready(request, endpoint, variant)
    headers = _container_headers(request, request.headers.get("Accept"))
    timeout = aiohttp.ClientTimeout(total=config.invocation_timeout_s, sock_connect=config.connect_timeout_s)
    try:
        async with request.app[SESSION_KEY].post(
            variant.invocations_url, data=body, headers=headers, timeout=timeout
        ) as upstream:
            if upstream.status >= 400:
                raise await _upstream_error(request, call, endpoint, variant, upstream)
            payload = await upstream.read()
    except TimeoutError as exc:
        raise _timeout_error(request, endpoint, variant) from exc
    except aiohttp.ClientError as exc:
        raise _connection_error(request, endpoint, variant, exc) from exc
    _health(request, variant).ever_ready = True
    call.container_status, call.bytes_out = upstream.status, len(payload)
    response_headers = _returned_headers(call, variant, upstream)
    response_headers["Content-Type"] = upstream.headers.get("Content-Type", "application/octet-stream")
    return web.Response(body=payload, status=200, headers=response_headers)


async def _forward_stream(request, call: Invocation, endpoint: Endpoint, variant: Variant, body: bytes):
    config = request.app[CONFIG_KEY]
    await _ensure_ready(request, endpoint, variant)
    headers = _container_headers(request, request.headers.get("X-Amzn-SageMaker-Accept"))
    # sock_read bounds the wait for the headers and for every next chunk: a container that stalls
    # mid-stream ends the stream with ModelInvocationTimeExceeded, like SageMaker.
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=config.connect_timeout_s, sock_read=config.invocation_timeout_s
    )
    session = request.app[SESSION_KEY]
    try:
        upstream = await session.post(variant.invocations_url, data=body, headers=headers, timeout=timeout)
    except TimeoutError as exc:
        raise _timeout_error(request, endpoint, variant) from exc
    except aiohttp.ClientError as exc:
        raise _connection_error(request, endpoint, variant, exc) from exc
    try:
        if upstream.status >= 400:
            raise await _upstream_error(request, call, endpoint, variant, upstream)
        _health(request, variant).ever_ready = True
        call.container_status = upstream.status
        response_headers = _returned_headers(call, variant, upstream)
        response_headers["Content-Type"] = EVENTSTREAM_CONTENT_TYPE
        response_headers["X-Amzn-SageMaker-Content-Type"] = upstream.headers.get(
            "Content-Type", "application/octet-stream"
        )
        out = web.StreamResponse(status=200, headers=response_headers)
        out.enable_chunked_encoding()
        await out.prepare(request)
        try:
            await _relay(call, upstream, out)
        except Exception:
            # Headers are sent, so the status cannot change: end the stream with the modeled failure.
            log.exception("stream relay failed", extra={"request_id": call.request_id})
            call.error = "InternalStreamFailure"
            await _end_stream(call, out, "InternalStreamFailure", "The stream processing failed.")
        return out
    finally:
        # A stream cut short (caller gone, error) closes the container connection, so the container
        # notices and can stop generating; a finished one goes back to the pool.
        if upstream.content.at_eof():
            upstream.release()
        else:
            upstream.close()


async def _relay(call: Invocation, upstream: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
    """Re-frame container bytes as PayloadPart events the moment they arrive; never wait for more.

    Reading from the container and writing to the caller fail in different ways, so each has its own
    handler: a container that stalls or breaks ends the stream with a modeled ModelStreamError; a
    caller that went away just ends the relay (and the caller of this closes the container connection).
    """
    while True:
        try:
            chunk = await upstream.content.readany()
        except TimeoutError:
            call.error = "ModelStreamError:ModelInvocationTimeExceeded"
            message = (
                f"Your model {CONTAINER_NAME} did not complete sending the inference response in the allotted time."
            )
            await _end_stream(call, out, "ModelStreamError", message, "ModelInvocationTimeExceeded")
            return
        except aiohttp.ClientError as exc:
            call.error = f"ModelStreamError:StreamBroken ({_describe(exc)})"
            message = (
                f"The connection to model {CONTAINER_NAME} was closed before it finished sending the "
                "inference response."
            )
            await _end_stream(call, out, "ModelStreamError", message, "StreamBroken")
            return
        if not chunk:
            break
        try:
            await out.write(eventstream.payload_part(chunk))
        except ConnectionResetError:
            call.error = "ClientDisconnected"
            return
        if call.first_part_ms is None:
            call.first_part_ms = round((time.perf_counter() - call.started) * 1000, 2)
        call.parts += 1
        call.bytes_out += len(chunk)
    await _end_stream(call, out)


async def _end_stream(
    call: Invocation,
    out: web.StreamResponse,
    exception_type: str | None = None,
    message: str = "",
    error_code: str | None = None,
) -> None:
    """Finish the event stream, with a modeled exception event first when one is given."""
    try:
        if exception_type:
            await out.write(eventstream.stream_exception(exception_type, message, error_code))
        await out.write_eof()
    except ConnectionResetError:
        call.error = (call.error or "") + " (caller already gone)"
