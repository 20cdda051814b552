"""The only module that talks to the SageMaker Runtime API: client set-up, InvokeEndpoint, error mapping.

Error mapping (runtime API errors per the service model; HTTP status the caller of our API sees):
    ModelError (424, container failed)          -> 502 ModelError
    ModelError, container answered 429 / 503    -> 429 EndpointThrottled / 503 EndpointUnavailable (the
                                                   server's own back-pressure stays retryable for the caller)
    ModelError, container answered 504          -> 504 EndpointTimeout (expired in the server's queue)
    ModelError, container answered 413 / 422    -> 400 ModelRejectedRequest, quoting the server's reason
    ModelError whose message says it timed out  -> 504 EndpointTimeout
    ThrottlingException / ModelNotReadyException -> 429 EndpointThrottled
    ValidationError naming the requested variant -> 400 UnknownVariant
    ValidationError (e.g. unknown endpoint)     -> 502 EndpointUnavailable (a deployment problem)
    ServiceUnavailable (503)                    -> 503 EndpointUnavailable
    read timeout (botocore)                     -> 504 EndpointTimeout
    connection failure                          -> 502 EndpointUnavailable
    200 whose details.finish_reason is timeout  -> 504 EndpointTimeout / 503 EndpointUnavailable
        or cancelled                               (logic.UNFINISHED_REASONS)
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from qa_function.config import FunctionConfig
from qa_function.logic import Answer, AskRequest, RequestError, UpstreamError, invoke_body, parse_model_output

THROTTLING_CODES = {"ThrottlingException", "ModelNotReadyException", "TooManyRequestsException"}
# Failures that happen before any generation starts, so another attempt costs the endpoint nothing.
RETRYABLE_CODES = THROTTLING_CODES | {"ServiceUnavailable", "InternalFailure"}


def make_client(config: FunctionConfig, read_timeout_s: float) -> Any:
    """A sagemaker-runtime client; the endpoint URL comes from the usual AWS settings, so
    AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME points it at a local emulator with no code change."""
    botocore_config = Config(
        # One attempt per call: invoke() retries what is worth retrying itself (throttling, connection
        # failures) and never a read timeout, whose generation is still running on the endpoint.
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=config.connect_timeout_s,
        read_timeout=read_timeout_s,
        tcp_keepalive=True,
    )
    return boto3.session.Session().client("sagemaker-runtime", config=botocore_config)


def invoke(client: Any, config: FunctionConfig, request: AskRequest) -> Answer:
    kwargs: dict[str, Any] = {
        "EndpointName": config.endpoint_name,
        "Body": invoke_body(request, config),
        "ContentType": "application/json",
        "Accept": "application/json",
    }
    if request.target_variant:
        kwargs["TargetVariant"] = request.target_variant
    started = time.perf_counter()
    for attempt in range(1, config.max_attempts + 1):
        try:
            response, body = _invoke_once(client, kwargs, request, retry=attempt < config.max_attempts)
            break
        except _Retry:
            time.sleep(random.uniform(0, min(1.0, 0.1 * 2**attempt)))  # full jitter, as AWS SDKs back off
    latency_ms = (time.perf_counter() - started) * 1000
    output = parse_model_output(body)
    return Answer(
        text=output.text,
        variant=response.get("InvokedProductionVariant"),
        latency_ms=latency_ms,
        finish_reason=output.finish_reason,
        sources=output.sources,
        sources_dropped=output.sources_dropped,
    )


class _Retry(Exception):
    """This attempt failed fast in a way another attempt may not (throttled, no connection)."""


def _invoke_once(client: Any, kwargs: dict[str, Any], request: AskRequest, *, retry: bool):
    """One InvokeEndpoint call. A read timeout is never retried: the endpoint is still generating the
    answer, and a second request would double the work of an endpoint that is already too slow."""
    try:
        response = client.invoke_endpoint(**kwargs)
        return response, response["Body"].read()
    except ClientError as e:
        if retry and e.response.get("Error", {}).get("Code") in RETRYABLE_CODES:
            raise _Retry() from e
        raise _from_client_error(e, request) from e
    except ReadTimeoutError as e:
        raise UpstreamError(
            504,
            "EndpointTimeout",
            f"The model endpoint did not answer within {client.meta.config.read_timeout:g} s",
        ) from e
    except (EndpointConnectionError, ConnectTimeoutError) as e:
        if retry:
            raise _Retry() from e
        raise UpstreamError(502, "EndpointUnavailable", "The model endpoint could not be reached") from e
    except BotoCoreError as e:
        raise UpstreamError(502, "EndpointUnavailable", f"Calling the model endpoint failed: {type(e).__name__}") from e


def _from_client_error(e: ClientError, request: AskRequest) -> Exception:
    error = e.response.get("Error", {})
    code = error.get("Code", "")
    message = error.get("Message", "") or ""
    if code == "ModelError":
        if "timed out" in message.lower():
            return UpstreamError(504, "EndpointTimeout", "The model did not answer in time")
        original = e.response.get("OriginalStatusCode")
        if original == 429:
            return UpstreamError(429, "EndpointThrottled", "The model endpoint is busy; retry in a moment")
        if original == 503:
            return UpstreamError(503, "EndpointUnavailable", "The model is loading or restarting; retry in a moment")
        if original == 504:  # the request waited in the server's queue past its deadline
            return UpstreamError(504, "EndpointTimeout", "The model endpoint was too busy to answer in time")
        # 422/413: the request was well-formed but too long or out of range for this model (the caller can fix it);
        # a 400 means our own request was malformed, which stays a 502.
        if original in (413, 422):
            return RequestError(400, "ModelRejectedRequest", f"The model refused the request: {_reason(e)}")
        detail = f" (the model container answered {original})" if original else ""
        return UpstreamError(502, "ModelError", f"The model failed to answer{detail}")
    if code in THROTTLING_CODES:
        return UpstreamError(429, "EndpointThrottled", "The model endpoint is busy; retry in a moment")
    if code == "ValidationError":
        if request.target_variant and "variant" in message.lower():
            return RequestError(
                400, "UnknownVariant", f'The endpoint has no production variant "{request.target_variant}"'
            )
        return UpstreamError(502, "EndpointUnavailable", "The model endpoint is not available (check ENDPOINT_NAME)")
    if code == "ServiceUnavailable":
        return UpstreamError(503, "EndpointUnavailable", "The model endpoint is temporarily unavailable")
    return UpstreamError(502, "EndpointUnavailable", f"The model endpoint failed ({code or 'unknown error'})")


def _reason(e: ClientError, limit: int = 300) -> str:
    """The model server's own error text (`{"error": ...}`, written for callers), cut short."""
    original = e.response.get("OriginalMessage") or ""
    try:
        text = json.loads(original)["error"]
    except (ValueError, TypeError, KeyError):
        text = "it did not say why"
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."
