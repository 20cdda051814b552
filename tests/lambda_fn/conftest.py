"""Fixtures for the Lambda handler tests: a fake LambdaContext, a clean environment, a stubbed client."""

from __future__ import annotations

import pytest
from lambda_fn.events_helpers import PAGE_ORIGIN, FakeLambdaContext
from lambda_fn.local_stack import FAKE_CREDS


@pytest.fixture
def lambda_env(monkeypatch):
    """Fake credentials and the function's settings; nothing from the developer's AWS config leaks in."""
    for key, value in {
        **FAKE_CREDS,
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
