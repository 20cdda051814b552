"""Build API Gateway proxy events in tests (the JSON files under events/ are the reference shapes)."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

QUESTION = "What is Amazon SageMaker?"
ANSWER = "Amazon SageMaker is a fully managed machine learning service."
PAGE_ORIGIN = "http://127.0.0.1:8000"
EVENTS_DIR = Path(__file__).parent / "events"


@dataclass
class FakeLambdaContext:
    """The attributes awslambdaric's LambdaContext offers that the handler may read."""

    function_name: str = "qa-function"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:qa-function"
    aws_request_id: str = "52fdfc07-2182-454f-963f-5f0f9a621d72"
    timeout_s: float = 29.0
    _deadline: float = field(default=0.0, repr=False)

    def __post_init__(self):
        self._deadline = time.monotonic() + self.timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return int(max(0.0, self._deadline - time.monotonic()) * 1000)


def load_event(name: str) -> dict:
    return json.loads((EVENTS_DIR / name).read_text())


def model_output(text: str = ANSWER, finish_reason: str | None = None, sources=None) -> bytes:
    """What the serving container's TGI-style /invocations returns (with `details` when a finish reason
    is given, as it does when asked for details; with `sources` when given, as a model with a retrieval
    index answers)."""
    item: dict = {"generated_text": text}
    if finish_reason is not None:
        item["details"] = {"finish_reason": finish_reason, "generated_tokens": 3, "input_length": 7, "seed": None}
    if sources is not None:
        item["sources"] = sources
    return json.dumps([item]).encode()


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
    encoded = base64.b64encode(raw).decode() if base64_body else raw.decode("utf-8")
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
