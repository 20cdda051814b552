"""The Lambda path as real processes on loopback: API Gateway emulator -> Lambda emulator -> awslambdaric
running the unmodified handler -> a fake SageMaker runtime. Also the runtime emulator's own error paths."""

from __future__ import annotations

import concurrent.futures
import http.client as http_client
import time
from urllib.parse import urlparse

import boto3
import pytest
from botocore.config import Config
from lambda_fn.local_stack import FAKE_CREDS, FUNCTIONS_DIR, Processes, http

pytestmark = pytest.mark.slow

KEY_A = "local-key-aaaaaaaaaaaaaaaaaaaa"
KEY_B = "local-key-bbbbbbbbbbbbbbbbbbbb"
ORIGIN = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    processes = Processes(tmp_path_factory.mktemp("lambda-path-logs"))
    yield processes
    processes.stop()


@pytest.fixture(scope="module")
def qa_lambda(procs):
    sagemaker = procs.fake_sagemaker(variant="tuned")
    return procs.lambda_emulator(sagemaker_url=sagemaker.url, CORS_ALLOW_ORIGINS=ORIGIN)


@pytest.fixture(scope="module")
def misbehaving(procs):
    """A function that fails on request; 2 s timeout, one environment at most."""
    return procs.lambda_emulator(
        handler="misbehaving.handler",
        task_root=FUNCTIONS_DIR,
        timeout_s=2,
        max_concurrency=1,
        name="misbehaving",
    )


@pytest.fixture(scope="module")
def lambda_client(misbehaving):
    return boto3.session.Session(
        aws_access_key_id=FAKE_CREDS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    ).client(
        "lambda",
        endpoint_url=misbehaving.url,
        config=Config(read_timeout=30, retries={"total_max_attempts": 1}),
    )


def invoke(client, payload: dict):
    import json

    response = client.invoke(FunctionName="qa-function", Payload=json.dumps(payload).encode())
    return response.get("FunctionError"), json.loads(response["Payload"].read())


# --- the QA function behind both event formats ----------------------------------------------------------


@pytest.mark.parametrize(("payload_format", "path"), [("1.0", "/prod/ask"), ("2.0", "/ask")])
def test_question_through_gateway_lambda_and_runtime(procs, qa_lambda, payload_format, path):
    gateway = procs.apigw(qa_lambda.url, "--payload-format", payload_format, name=f"apigw-{payload_format}")
    r = http("POST", gateway.url + path, {"question": "What is SageMaker?"}, {"Origin": ORIGIN})
    assert r.status == 200, (r.body, qa_lambda.log())
    body = r.json()
    assert body["answer"].startswith("SageMaker is a fully managed service")
    assert body["variant"] == "tuned"
    assert body["latency_ms"] > 0
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["x-amzn-requestid"]
    log = qa_lambda.log()
    assert f'"payload_version": "{payload_format}"' in log
    assert "What is SageMaker" not in log  # the function's logs never carry the question

    preflight = http("OPTIONS", gateway.url + path, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status == 204
    assert "x-api-key" in preflight.headers["access-control-allow-headers"]


def test_function_errors_surface_as_json_with_status(procs, qa_lambda):
    gateway = procs.apigw(qa_lambda.url, name="apigw-errors")
    model_error = http("POST", gateway.url + "/ask", {"question": "[model-error] please"}, {"Origin": ORIGIN})
    assert model_error.status == 502
    assert model_error.json()["error_type"] == "ModelError"
    assert model_error.headers["access-control-allow-origin"] == ORIGIN
    bad = http("POST", gateway.url + "/ask", b"{not json", {"Content-Type": "application/json"})
    assert bad.status == 400 and bad.json()["error_type"] == "InvalidJSON"
    # 200 from the endpoint, but the model server gave up on the request (expired in its queue).
    expired = http("POST", gateway.url + "/ask", {"question": "[finish=timeout] too late"}, {"Origin": ORIGIN})
    assert expired.status == 504 and expired.json()["error_type"] == "EndpointTimeout", expired.body


def test_api_key_and_throttling(procs, qa_lambda):
    gateway = procs.apigw(
        qa_lambda.url, "--api-keys", f"{KEY_A},{KEY_B}", "--throttle-rate", "0.05", "--throttle-burst", "2",
        name="apigw-keys",
    )  # fmt: skip
    ask = {"question": "What is SageMaker?"}
    missing = http("POST", gateway.url + "/ask", ask)
    assert (missing.status, missing.json()) == (403, {"message": "Forbidden"})
    wrong = http("POST", gateway.url + "/ask", ask, {"x-api-key": "not-a-key-not-a-key-not"})
    assert wrong.status == 403
    assert http("OPTIONS", gateway.url + "/ask", headers={"Origin": ORIGIN}).status == 204  # no key on preflight

    statuses = [http("POST", gateway.url + "/ask", ask, {"x-api-key": KEY_A}).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    throttled = http("POST", gateway.url + "/ask", ask, {"x-api-key": KEY_A})
    assert (throttled.status, throttled.json()) == (429, {"message": "Too Many Requests"})
    assert http("POST", gateway.url + "/ask", ask, {"x-api-key": KEY_B}).status == 200  # per-key bucket


def test_integration_timeout_is_504(procs, qa_lambda):
    gateway = procs.apigw(qa_lambda.url, "--integration-timeout", "1", name="apigw-timeout")
    started = time.monotonic()
    r = http("POST", gateway.url + "/ask", {"question": "[sleep=2.5] slow one"})
    assert (r.status, r.json()) == (504, {"message": "Endpoint request timed out"})
    assert time.monotonic() - started < 2.4


def test_payload_over_10_mb_is_413_without_reading_it(procs, qa_lambda):
    gateway = procs.apigw(qa_lambda.url, name="apigw-payload")
    url = urlparse(gateway.url)
    conn = http_client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.putrequest("POST", "/ask")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10 * 1024 * 1024 + 1))
    conn.endheaders()  # the body is never sent: the gateway answers from the header alone
    response = conn.getresponse()
    assert response.status == 413
    assert response.read() == b'{"message": "Request Too Long"}'
    conn.close()


# --- the runtime emulator's error paths (misbehaving function) -----------------------------------------


def test_runtime_echo_and_context(lambda_client):
    error, body = invoke(lambda_client, {"action": "context"})
    assert error is None
    assert body["function_name"] == "qa-function"
    assert 0 < body["remaining_ms"] <= 2000
    assert body["arn"].endswith(":function:qa-function")
    assert invoke(lambda_client, {"action": "echo", "x": 1}) == (None, {"action": "echo", "x": 1})


def test_runtime_function_error(lambda_client):
    error, body = invoke(lambda_client, {"action": "raise"})
    assert error == "Unhandled"
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"] == "asked to fail"


def test_runtime_timeout_replaces_the_environment(lambda_client):
    _, before = invoke(lambda_client, {"action": "context"})
    error, body = invoke(lambda_client, {"action": "sleep", "seconds": 5})
    assert error == "Unhandled"
    assert "Task timed out after 2.00 seconds" in body["errorMessage"]
    _, after = invoke(lambda_client, {"action": "context"})
    assert after["pid"] != before["pid"]  # a fresh (cold) environment


def test_runtime_crash_is_reported(lambda_client):
    error, body = invoke(lambda_client, {"action": "exit"})
    assert error == "Unhandled"
    assert body["errorType"] == "Runtime.ExitError"
    assert invoke(lambda_client, {"action": "echo"})[0] is None  # and the next call gets a new environment


def test_runtime_concurrency_limit(lambda_client, misbehaving, procs):
    gateway = procs.apigw(misbehaving.url, name="apigw-misbehaving")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(invoke, lambda_client, {"action": "sleep", "seconds": 1})
        time.sleep(0.3)
        with pytest.raises(lambda_client.exceptions.TooManyRequestsException):
            invoke(lambda_client, {"action": "echo"})
        # API Gateway does not pass Lambda's 429 on: the caller sees a 500.
        through_gateway = http("POST", gateway.url + "/x", {"action": "echo"})
        assert (through_gateway.status, through_gateway.json()) == (500, {"message": "Internal server error"})
        assert slow.result() == (None, {"slept": 1})
    # A function error and a malformed proxy result are both 502 at the gateway.
    assert http("POST", gateway.url + "/x", {"action": "raise"}).status == 502
    assert http("POST", gateway.url + "/x", {"action": "echo"}).status == 502
    ok = http("POST", gateway.url + "/x", {"action": "proxy", "result": {"statusCode": 201, "body": "made"}})
    assert (ok.status, ok.body) == (201, b"made")


def test_init_error_is_reported(procs):
    broken = procs.lambda_emulator(handler="broken_init.handler", task_root=FUNCTIONS_DIR, name="broken")
    r = http("POST", broken.url + "/2015-03-31/functions/function/invocations", {"x": 1})
    assert r.status == 200
    assert r.headers["x-amz-function-error"] == "Unhandled"
    assert "broken at import" in r.json()["errorMessage"]
