"""Fixtures for the Lambda handler tests: a fake LambdaContext, a clean environment, a stubbed client."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

EVENTS_DIR = Path(__file__).parent / "events"
PAGE_ORIGIN = "http://127.0.0.1:8000"


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


@pytest.fixture
def lambda_env(monkeypatch):
    """Fake credentials and the function's settings; nothing from the developer's AWS config leaks in."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "ENDPOINT_NAME": "qa-endpoint",
        "CORS_ALLOW_ORIGINS": PAGE_ORIGIN,
    }.items():
        monkeypatch.setenv(key, value)
    for key in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME",
        "CORS_ALLOW_CREDENTIALS",
    ):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.fixture
def fresh_handler(lambda_env):
    """The handler module with its per-cold-start state cleared before and after the test."""
    from qa_function import handler

    handler.reset_cold_start()
    yield handler
    handler.reset_cold_start()


@pytest.fixture
def context():
    return FakeLambdaContext()


@pytest.fixture
def stubbed(fresh_handler, context):
    """(handler module, Stubber) with the handler's own real boto3 client stubbed: no network."""
    from botocore.stub import Stubber

    runtime = fresh_handler.get_runtime(context)
    with Stubber(runtime.client) as stubber:
        yield fresh_handler, stubber
        stubber.assert_no_pending_responses()
