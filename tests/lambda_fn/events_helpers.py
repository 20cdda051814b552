"""Build API Gateway proxy events in tests (the JSON files under events/ are the reference shapes)."""

from __future__ import annotations

import base64
import json

QUESTION = "What is Amazon SageMaker?"
ANSWER = "Amazon SageMaker is a fully managed machine learning service."
PAGE_ORIGIN = "http://127.0.0.1:8000"


def model_output(text: str = ANSWER) -> bytes:
    """What the serving container's TGI-style /invocations returns."""
    return json.dumps([{"generated_text": text}]).encode()


def ask_event(
    body: dict | bytes,
    *,
    version: str = "1.0",
    path: str = "/ask",
    method: str = "POST",
    origin: str = PAGE_ORIGIN,
    base64_body: bool = False,
) -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    encoded = base64.b64encode(raw).decode() if base64_body else raw.decode("utf-8", errors="surrogateescape")
    if base64_body is False and not isinstance(body, bytes):
        encoded = raw.decode()
    headers = {"content-type": "application/json", "origin": origin}
    if version == "2.0":
        return {
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": path,
            "rawQueryString": "",
            "headers": headers,
            "requestContext": {
                "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1"},
                "requestId": "test-request",
                "stage": "$default",
            },
            "body": encoded,
            "isBase64Encoded": base64_body,
        }
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": {k.title(): v for k, v in headers.items()},
        "multiValueHeaders": {k.title(): [v] for k, v in headers.items()},
        "requestContext": {"httpMethod": method, "requestId": "test-request", "stage": "prod"},
        "body": encoded,
        "isBase64Encoded": base64_body,
    }
