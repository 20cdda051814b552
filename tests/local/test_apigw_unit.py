"""API Gateway emulator in-process: event shapes, result mapping, gateway responses, token bucket.
The function is a Python callable here; tests/local/test_apigw_processes.py runs the real processes."""

from __future__ import annotations

import base64
import json

import pytest
from apigw_emulator.app import IntegrationFailure, IntegrationTimeout, LambdaReply, create_app
from apigw_emulator.config import GatewayConfig, parse_args
from apigw_emulator.events import MalformedProxyResult, parse_result
from apigw_emulator.throttle import TokenBucket

KEY = "k" * 24


class Recorder:
    """A fake Lambda: records events, answers with a fixed proxy result."""

    def __init__(self, result=None, error=None):
        self.events: list[dict] = []
        self.result = result if result is not None else {"statusCode": 200, "body": '{"ok": true}'}
        self.error = error

    def __call__(self, payload: bytes) -> LambdaReply:
        self.events.append(json.loads(payload))
        if self.error:
            raise self.error
        return LambdaReply(json.dumps(self.result).encode())


def client_for(recorder, **config):
    return create_app(GatewayConfig(**config), invoke=recorder, log=lambda **_: None).test_client()


def test_v1_event_shape():
    fake = Recorder()
    client = client_for(fake)
    r = client.post(
        "/prod/ask?a=1&a=2&b=3",
        data=b'{"question": "q"}',
        headers={"Content-Type": "application/json", "X-Multi": "one", "Origin": "http://x:1"},
    )
    assert r.status_code == 200 and r.get_json() == {"ok": True}
    event = fake.events[0]
    assert event["httpMethod"] == "POST"
    assert event["path"] == "/ask"
    assert event["resource"] == "/{proxy+}"
    assert event["pathParameters"] == {"proxy": "ask"}
    assert event["queryStringParameters"] == {"a": "2", "b": "3"}
    assert event["multiValueQueryStringParameters"] == {"a": ["1", "2"], "b": ["3"]}
    assert event["headers"]["Origin"] == "http://x:1"
    assert event["multiValueHeaders"]["X-Multi"] == ["one"]
    assert event["headers"]["X-Forwarded-Proto"] == "http"
    assert event["requestContext"]["stage"] == "prod"
    assert event["requestContext"]["path"] == "/prod/ask"
    assert event["requestContext"]["identity"]["sourceIp"] == "127.0.0.1"
    assert event["body"] == '{"question": "q"}' and event["isBase64Encoded"] is False
    assert "version" not in event  # REST events carry no version key
    assert r.headers["x-amzn-RequestId"] == event["requestContext"]["requestId"]


def test_v2_event_shape_and_binary_body():
    fake = Recorder()
    client = client_for(fake, payload_format="2.0", stage="$default")
    client.set_cookie("s", "1")
    client.set_cookie("t", "2")
    client.post("/ask?a=1&a=2", data=b"\x00\x01", headers={"Content-Type": "application/octet-stream"})
    event = fake.events[0]
    assert event["version"] == "2.0"
    assert event["routeKey"] == "$default"
    assert event["rawPath"] == "/ask" and event["rawQueryString"] == "a=1&a=2"
    assert event["queryStringParameters"] == {"a": "1,2"}
    assert event["cookies"] == ["s=1", "t=2"]
    assert event["requestContext"]["http"]["method"] == "POST"
    assert event["headers"]["content-type"] == "application/octet-stream"
    assert event["isBase64Encoded"] is True and base64.b64decode(event["body"]) == b"\x00\x01"


def test_v2_json_body_is_text_and_empty_body_is_absent():
    fake = Recorder()
    client = client_for(fake, payload_format="2.0", stage="$default")
    client.post("/ask", json={"question": "q"})
    client.get("/ask")
    assert fake.events[0]["isBase64Encoded"] is False and json.loads(fake.events[0]["body"]) == {"question": "q"}
    assert "body" not in fake.events[1]


def test_api_key_required_except_for_preflight():
    fake = Recorder()
    client = client_for(fake, api_keys=frozenset({KEY}))
    for headers in ({}, {"x-api-key": "wrong-key-wrong-key-wrong"}):
        r = client.post("/ask", json={"question": "q"}, headers=headers)
        assert r.status_code == 403
        assert r.get_json() == {"message": "Forbidden"}
        assert r.headers["x-amzn-ErrorType"] == "ForbiddenException"
    assert client.post("/ask", json={"question": "q"}, headers={"x-api-key": KEY}).status_code == 200
    assert fake.events[-1]["requestContext"]["identity"]["apiKey"] == KEY
    assert client.options("/ask").status_code == 200  # the fake function answers 200
    assert len(fake.events) == 2


def test_throttling_is_per_key_token_bucket():
    fake = Recorder()
    client = client_for(fake, api_keys=frozenset({KEY, "z" * 24}), throttle_rate=0.01, throttle_burst=2)
    statuses = [client.post("/ask", headers={"x-api-key": KEY}).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    r = client.post("/ask", headers={"x-api-key": KEY})
    assert r.get_json() == {"message": "Too Many Requests"}
    assert client.post("/ask", headers={"x-api-key": "z" * 24}).status_code == 200  # other key, own bucket


def test_token_bucket_refills_at_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate_per_s=2, burst=1, clock=lambda: now[0])
    assert bucket.try_take() and not bucket.try_take()
    now[0] += 0.4
    assert not bucket.try_take()
    now[0] += 0.1
    assert bucket.try_take()


def test_a_body_is_read_one_byte_past_the_limit_at_most():
    """What keeps a chunked body (no Content-Length) out of memory; over sockets: test_hostile_emulators.py."""
    import io

    from apigw_emulator.app import read_at_most

    endless = io.BytesIO(b"x" * 1_000_000)
    assert read_at_most(endless, 100) is None
    assert endless.tell() == 101
    assert read_at_most(io.BytesIO(b"x" * 100), 100) == b"x" * 100
    assert read_at_most(io.BytesIO(b""), 100) == b""


def test_payload_limit():
    fake = Recorder()
    client = client_for(fake, max_payload_bytes=100)
    r = client.post("/ask", data=b"x" * 101)
    assert r.status_code == 413 and r.get_json() == {"message": "Request Too Long"}
    assert client.post("/ask", data=b"x" * 100).status_code == 200
    assert len(fake.events) == 1


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (IntegrationTimeout(), 504, "Endpoint request timed out"),
        (IntegrationFailure("TooManyRequestsException"), 500, "Internal server error"),
    ],
)
def test_integration_failures(error, status, message):
    client = client_for(Recorder(error=error), gateway_responses_allow_origin="http://page:1")
    r = client.post("/ask")
    assert r.status_code == status and r.get_json() == {"message": message}
    assert r.headers["Access-Control-Allow-Origin"] == "http://page:1"


def test_function_error_is_502():
    class Failing(Recorder):
        def __call__(self, payload):
            return LambdaReply(b'{"errorType": "ValueError", "errorMessage": "x"}', "Unhandled")

    r = client_for(Failing()).post("/ask")
    assert r.status_code == 502 and r.get_json() == {"message": "Internal server error"}


def test_result_headers_multi_values_and_base64_body():
    result = {
        "statusCode": 201,
        "headers": {"X-One": "1", "Content-Type": "text/plain"},
        "multiValueHeaders": {"Set-Cookie": ["a=1", "b=2"]},
        "body": base64.b64encode(b"hello").decode(),
        "isBase64Encoded": True,
    }
    r = client_for(Recorder(result)).get("/x")
    assert r.status_code == 201
    assert r.data == b"hello"
    assert r.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert r.headers["Content-Type"] == "text/plain"


def test_result_defaults_to_json_content_type():
    r = client_for(Recorder({"statusCode": 204})).get("/x")
    assert r.status_code == 204 and r.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    "result",
    [
        {"statusCode": 200, "body": "x", "extra": 1},
        {"statusCode": "abc"},
        {"body": "x"},
        {"statusCode": 200, "body": {"not": "a string"}},
        ["not", "an", "object"],
    ],
)
def test_malformed_v1_results(result):
    with pytest.raises(MalformedProxyResult):
        parse_result(json.dumps(result).encode(), version="1.0")
    assert client_for(Recorder(result)).get("/x").status_code == 502


def test_v2_result_without_status_code_is_a_json_body():
    parsed = parse_result(b'{"answer": 42}', version="2.0")
    assert parsed.status == 200 and json.loads(parsed.body) == {"answer": 42}
    cookies = parse_result(b'{"statusCode": 200, "cookies": ["a=1"], "body": ""}', version="2.0")
    assert ("Set-Cookie", "a=1") in cookies.headers


def test_config_from_env_and_validation():
    config = parse_args([], env={"APIGW_PAYLOAD_FORMAT": "2.0", "APIGW_API_KEYS": f"{KEY}, ",
                                 "APIGW_THROTTLE_RATE": "5", "APIGW_THROTTLE_BURST": "7"})  # fmt: skip
    assert config.payload_format == "2.0" and config.stage == "$default"
    assert config.api_keys == frozenset({KEY})
    assert (config.throttle_rate, config.throttle_burst) == (5.0, 7)
    with pytest.raises(SystemExit):
        parse_args(["--api-keys", "short"], env={})
