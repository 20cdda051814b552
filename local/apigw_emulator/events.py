"""The only module that knows API Gateway's Lambda proxy shapes: HTTP request -> event, proxy result -> HTTP.

Shapes follow what API Gateway sends (and `sam local start-api` builds):
  * payload v1 (REST API proxy): httpMethod, path, resource, headers + multiValueHeaders,
    queryStringParameters + multiValueQueryStringParameters (empty -> null), pathParameters, stageVariables,
    requestContext{..., identity{apiKey, sourceIp, ...}}, body, isBase64Encoded.
  * payload v2 (HTTP API): version "2.0", routeKey, rawPath, rawQueryString, cookies, headers (lower-case,
    repeats comma-joined), queryStringParameters (comma-joined), requestContext{http{...}, ...}, body,
    isBase64Encoded.
Results: v1 accepts only statusCode/headers/multiValueHeaders/body/isBase64Encoded; v2 also cookies, and a
result without statusCode is taken as a 200 JSON body.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

V1_RESULT_KEYS = {"statusCode", "headers", "multiValueHeaders", "body", "isBase64Encoded"}
V2_RESULT_KEYS = V1_RESULT_KEYS | {"cookies"}
# HTTP APIs pass these bodies as text and base64-encode everything else.
TEXT_TYPES = (
    "text/",
    "application/json",
    "application/xml",
    "application/javascript",
    "application/x-www-form",
)
ACCOUNT_ID = "123456789012"
API_ID = "local"


class MalformedProxyResult(ValueError):
    """The function's result is not a valid proxy response (API Gateway answers 502)."""


@dataclass(frozen=True)
class IncomingRequest:
    """What API Gateway sees of an HTTP request; built by app.py from the server's request object."""

    method: str
    path: str  # without the stage prefix
    raw_query: str
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]  # original names, in order, repeats kept
    body: bytes
    source_ip: str
    host: str
    api_key: str | None


@dataclass(frozen=True)
class ProxyResult:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def build_event(
    req: IncomingRequest,
    *,
    version: str,
    stage: str,
    binary_media_types: tuple[str, ...],
    request_id: str | None = None,
) -> dict:
    request_id = request_id or str(uuid.uuid4())
    now = time.time()
    content_type = next((v for k, v in req.headers if k.lower() == "content-type"), "")
    if version == "2.0":
        is_b64 = bool(req.body) and not content_type.lower().startswith(TEXT_TYPES)
    else:
        is_b64 = bool(req.body) and _is_binary(content_type, binary_media_types)
    body = (base64.b64encode(req.body).decode() if is_b64 else req.body.decode("utf-8", "replace")) or None
    forwarded = [
        ("X-Forwarded-For", req.source_ip),
        ("X-Forwarded-Port", req.host.rsplit(":", 1)[-1]),
        ("X-Forwarded-Proto", "http"),
    ]
    headers = req.headers + [h for h in forwarded if h[0].lower() not in {k.lower() for k, _ in req.headers}]
    request_time = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
    user_agent = next((v for k, v in headers if k.lower() == "user-agent"), "")
    proxy = req.path.lstrip("/")

    if version == "2.0":
        joined: dict[str, str] = {}
        cookies: list[str] = []
        for name, value in headers:
            if name.lower() == "cookie":
                cookies.extend(c.strip() for c in value.split(";") if c.strip())
                continue
            key = name.lower()
            joined[key] = f"{joined[key]},{value}" if key in joined else value
        query: dict[str, str] = {}
        for name, value in req.query:
            query[name] = f"{query[name]},{value}" if name in query else value
        event: dict[str, Any] = {
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": req.path if stage == "$default" else f"/{stage}{req.path}",
            "rawQueryString": req.raw_query,
            "headers": joined,
            "requestContext": {
                "accountId": ACCOUNT_ID,
                "apiId": API_ID,
                "domainName": req.host,
                "domainPrefix": req.host.split(".")[0].split(":")[0],
                "http": {
                    "method": req.method,
                    "path": req.path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": req.source_ip,
                    "userAgent": user_agent,
                },
                "requestId": request_id,
                "routeKey": "$default",
                "stage": stage,
                "time": request_time,
                "timeEpoch": int(now * 1000),
            },
            "isBase64Encoded": is_b64,
        }
        if cookies:
            event["cookies"] = cookies
        if query:
            event["queryStringParameters"] = query
        if body is not None:
            event["body"] = body
        return event

    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for name, value in headers:
        single[name] = value
        multi.setdefault(name, []).append(value)
    query_single: dict[str, str] = {}
    query_multi: dict[str, list[str]] = {}
    for name, value in req.query:
        query_single[name] = value  # the single-value map keeps the last value, like API Gateway
        query_multi.setdefault(name, []).append(value)
    return {
        "resource": "/{proxy+}",
        "path": req.path,
        "httpMethod": req.method,
        "headers": single or None,
        "multiValueHeaders": multi or None,
        "queryStringParameters": query_single or None,
        "multiValueQueryStringParameters": query_multi or None,
        "pathParameters": {"proxy": proxy} if proxy else None,
        "stageVariables": None,
        "requestContext": {
            "resourceId": "proxy0",
            "resourcePath": "/{proxy+}",
            "httpMethod": req.method,
            "extendedRequestId": request_id,
            "requestTime": request_time,
            "requestTimeEpoch": int(now * 1000),
            "path": f"/{stage}{req.path}",
            "accountId": ACCOUNT_ID,
            "protocol": "HTTP/1.1",
            "stage": stage,
            "domainPrefix": req.host.split(".")[0].split(":")[0],
            "domainName": req.host,
            "requestId": request_id,
            "apiId": API_ID,
            "identity": {
                "apiKey": req.api_key,
                "apiKeyId": None,
                "sourceIp": req.source_ip,
                "userAgent": user_agent,
                "accountId": None,
                "caller": None,
                "user": None,
                "userArn": None,
                "cognitoIdentityPoolId": None,
                "cognitoIdentityId": None,
                "cognitoAuthenticationType": None,
                "cognitoAuthenticationProvider": None,
            },
        },
        "body": body,
        "isBase64Encoded": is_b64,
    }


def _is_binary(content_type: str, binary_media_types: tuple[str, ...]) -> bool:
    mime = content_type.split(";")[0].strip().lower()
    for pattern in binary_media_types:
        pattern = pattern.lower()
        if pattern == "*/*" or pattern == mime or (pattern.endswith("/*") and mime.startswith(pattern[:-1])):
            return True
    return False


def parse_result(payload: bytes, *, version: str) -> ProxyResult:
    """The function's return value -> HTTP response, or MalformedProxyResult (API Gateway's 502)."""
    try:
        result = json.loads(payload)
    except ValueError as e:
        raise MalformedProxyResult("function result is not JSON") from e
    if version == "2.0" and not (isinstance(result, dict) and "statusCode" in result):
        # HTTP API: any JSON without statusCode is the body of a 200.
        return ProxyResult(200, [("Content-Type", "application/json")], json.dumps(result).encode())
    if not isinstance(result, dict):
        raise MalformedProxyResult("function result is not a JSON object")
    extra = set(result) - (V2_RESULT_KEYS if version == "2.0" else V1_RESULT_KEYS)
    if extra:
        raise MalformedProxyResult(f"unexpected keys in the proxy result: {sorted(extra)}")
    status = result.get("statusCode")
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise MalformedProxyResult(f"statusCode {status!r} is not an HTTP status")
    headers: list[tuple[str, str]] = []
    single = result.get("headers") or {}
    multi = result.get("multiValueHeaders") or {}
    if not isinstance(single, dict) or not isinstance(multi, dict):
        raise MalformedProxyResult("headers and multiValueHeaders must be objects")
    for name, values in multi.items():
        if not isinstance(values, list):
            raise MalformedProxyResult(f"multiValueHeaders[{name!r}] must be a list")
        headers.extend((name, _header_value(v)) for v in values)
    # A name in both maps: API Gateway keeps the multi-value list and appends the single value.
    headers.extend((name, _header_value(v)) for name, v in single.items())
    for cookie in result.get("cookies") or []:
        headers.append(("Set-Cookie", str(cookie)))
    if not any(name.lower() == "content-type" for name, _ in headers):
        headers.append(("Content-Type", "application/json"))
    body = result.get("body")
    if body is None:
        raw = b""
    elif not isinstance(body, str):
        if version == "2.0":
            raw = json.dumps(body).encode()
        else:
            raise MalformedProxyResult("body must be a string")
    elif result.get("isBase64Encoded"):
        try:
            raw = base64.b64decode(body, validate=True)
        except ValueError as e:
            raise MalformedProxyResult("isBase64Encoded body does not decode") from e
    else:
        raw = body.encode()
    return ProxyResult(status, headers, raw)


def _header_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
