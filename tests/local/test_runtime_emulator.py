"""Unmodified boto3 against the endpoint emulator running as a real server process, in front of fake
serving containers (tests/local/fake_container.py), all on loopback.

Every frame the emulator streams is checked by botocore's own event-stream parser, either through
boto3 or fed by hand in odd-sized pieces.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest
import urllib3
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError, EventStreamError
from fixtures.processes import stop_processes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FAKE_CONTAINER = Path(__file__).resolve().parent / "fake_container.py"
INVOCATION_TIMEOUT_S = 2.0
MAX_BODY = 6_291_456
# urllib3 rather than requests: it comes with botocore, so the test needs nothing boto3 does not.
HTTP = urllib3.PoolManager(retries=False, timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            HTTP.request("GET", url, timeout=0.5)
            return
        except urllib3.exceptions.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()}")


class Processes:
    """Starts servers as child processes and always stops them, logging to files for failures."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], ready_url: str, env: dict | None = None):
        log = self.log_dir / f"{name}.log"
        proc = subprocess.Popen(
            args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.procs.append(proc)
        _wait_http(ready_url, proc, log)
        return proc

    def fake_container(self, name: str, port: int, *extra: str):
        return self.start(
            f"container-{name}",
            [sys.executable, str(FAKE_CONTAINER), "--port", str(port), "--name", name, *extra],
            f"http://127.0.0.1:{port}/ping",
        )

    def stop_all(self) -> None:
        stop_processes(self.procs, grace_s=5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Emulator + containers: `tuned` and `base` (healthy), `loading` (/ping 503), `doomed` (killed by a
    test), and an endpoint whose container port nobody listens on."""
    tmp = tmp_path_factory.mktemp("runtime-emulator")
    procs = Processes(tmp)
    ports = {name: _free_port() for name in ("tuned", "base", "loading", "doomed", "closed", "emulator")}
    try:
        procs.fake_container("tuned", ports["tuned"])
        procs.fake_container("base", ports["base"])
        procs.fake_container("loading", ports["loading"], "--not-ready")
        doomed = procs.fake_container("doomed", ports["doomed"])

        def url(name):
            return f"http://127.0.0.1:{ports[name]}"

        config = {
            "invocation_timeout_s": INVOCATION_TIMEOUT_S,
            "routing_seed": 7,
            "endpoints": {
                "chat": {"variants": [{"name": "AllTraffic", "url": url("tuned")}]},
                "ab": {
                    "variants": [
                        {"name": "tuned", "url": url("tuned"), "weight": 0.8},
                        {"name": "base", "url": url("base"), "weight": 0.2},
                    ]
                },
                "loading": {"variants": [{"url": url("loading")}]},
                "ghost": {"variants": [{"url": url("closed")}]},
                "doomed": {"variants": [{"url": url("doomed")}]},
            },
        }
        config_path = tmp / "endpoints.json"
        config_path.write_text(json.dumps(config))
        emulator_url = f"http://127.0.0.1:{ports['emulator']}"
        procs.start(
            "emulator",
            [sys.executable, "-m", "runtime_emulator", "--config", str(config_path)],
            f"{emulator_url}/ping",
            env={"RUNTIME_EMULATOR_PORT": str(ports["emulator"])},
        )
        yield {"url": emulator_url, "container_url": url("tuned"), "doomed": doomed, "log_dir": tmp}
    finally:
        procs.stop_all()


@pytest.fixture
def runtime(stack, monkeypatch):
    """A plain boto3 client that finds the emulator through AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", stack["url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # One attempt: a retried ModelNotReadyException would hide what the emulator answered.
    return boto3.client("sagemaker-runtime", config=Config(retries={"max_attempts": 1, "mode": "standard"}))


def _log_records(stack) -> list[dict]:
    lines = (stack["log_dir"] / "emulator.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _sse_events(parts: list[bytes]) -> list[dict]:
    """Reassemble SSE frames across PayloadPart boundaries, as a streaming client must."""
    buffer, events = b"", []
    for part in parts:
        buffer += part
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            assert frame.startswith(b"data:")
            events.append(json.loads(frame[len(b"data:") :]))
    assert buffer == b"", "stream ended inside a frame"
    return events


def _stream_parts(response) -> list[bytes]:
    parts = []
    for event in response["Body"]:
        assert set(event) == {"PayloadPart"}
        parts.append(event["PayloadPart"]["Bytes"])
    return parts


# ------------------------------------------------------------------------------------------ happy path


def test_invoke_endpoint_forwards_body_and_headers_both_ways(runtime):
    response = runtime.invoke_endpoint(
        EndpointName="chat",
        Body=json.dumps({"inputs": "What is SageMaker?"}),
        ContentType="application/json",
        Accept="application/json",
        CustomAttributes="trace=abc-123",
    )

    body = json.loads(response["Body"].read())
    assert body["generated_text"] == "echo: What is SageMaker?"
    assert body["headers"]["Content-Type"] == "application/json"
    assert body["headers"]["Accept"] == "application/json"
    assert body["headers"]["X-Amzn-SageMaker-Custom-Attributes"] == "trace=abc-123"
    assert "Authorization" not in body["headers"]  # SageMaker strips what the API does not define
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert response["CustomAttributes"] == "echo=trace=abc-123"
    assert response["ResponseMetadata"]["RequestId"]


def test_stream_relays_split_sse_frames_that_reassemble(runtime):
    response = runtime.invoke_endpoint_with_response_stream(
        EndpointName="chat",
        Body=json.dumps({"inputs": "hi", "stream": True, "tokens": 6}),
        ContentType="application/json",
        Accept="text/event-stream",
        CustomAttributes="k=v",
    )

    assert response["ContentType"].startswith("text/event-stream")
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert response["CustomAttributes"] == "echo=k=v"
    parts = _stream_parts(response)
    events = _sse_events(parts)
    assert [e["token"]["text"] for e in events] == [f"tuned-t{i} " for i in range(6)]
    assert events[-1]["generated_text"] == "".join(f"tuned-t{i} " for i in range(6))
    # The container writes each frame in two pieces: parts do not line up with SSE frames.
    assert any(not p.endswith(b"\n\n") for p in parts)


def test_stream_passes_accept_from_x_amzn_sagemaker_accept(runtime):
    response = runtime.invoke_endpoint_with_response_stream(
        EndpointName="chat", Body=b'{"inputs": "x"}', ContentType="application/json", Accept="text/plain"
    )

    body = json.loads(b"".join(_stream_parts(response)))
    assert body["headers"]["Accept"] == "text/plain"
    assert "X-Amzn-SageMaker-Accept" not in body["headers"]
    assert response["ContentType"] == "application/json"


def test_stream_bytes_are_exactly_the_containers_in_valid_frames(stack):
    """Raw wire check: botocore's parser, fed 7 bytes at a time, accepts every frame (both CRCs), and
    the payloads concatenate to the very bytes the container sends when called directly."""
    body = json.dumps({"inputs": "hi", "stream": True, "tokens": 8}).encode()
    direct = HTTP.request("POST", f"{stack['container_url']}/invocations", body=body).data

    response = HTTP.request("POST", f"{stack['url']}/endpoints/chat/invocations-response-stream", body=body)
    raw = response.data  # the chunked transfer encoding already taken off

    assert response.headers["Content-Type"] == "application/vnd.amazon.eventstream"
    assert response.headers["X-Amzn-SageMaker-Content-Type"].startswith("text/event-stream")
    assert response.headers["x-Amzn-Invoked-Production-Variant"] == "AllTraffic"
    assert response.headers.get("Transfer-Encoding") == "chunked"
    parser, messages = EventStreamBuffer(), []
    for i in range(0, len(raw), 7):
        parser.add_data(raw[i : i + 7])
        messages.extend(parser)
    assert {m.headers[":event-type"] for m in messages} == {"PayloadPart"}
    assert b"".join(m.payload for m in messages) == direct


def test_concurrent_streams_do_not_wait_for_each_other(runtime):
    """Eight streams of ten 0.1 s tokens: served one after another they would take 8 s."""
    body = json.dumps({"inputs": "hi", "stream": True, "tokens": 10, "token_delay": 0.1})
    results, errors = [], []

    def one():
        try:
            response = runtime.invoke_endpoint_with_response_stream(EndpointName="chat", Body=body)
            results.append(len(_sse_events(_stream_parts(response))))
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    elapsed = time.monotonic() - started

    assert not errors and results == [10] * 8
    assert elapsed < 4.0, f"8 concurrent 1 s streams took {elapsed:.1f} s"


def test_client_disconnect_mid_stream_leaves_the_emulator_serving(stack, runtime):
    body = json.dumps({"inputs": "hi", "stream": True, "tokens": 50, "token_delay": 0.02}).encode()
    conn = http.client.HTTPConnection(urllib3.util.parse_url(stack["url"]).netloc, timeout=10)
    conn.request("POST", "/endpoints/chat/invocations-response-stream", body)
    response = conn.getresponse()
    assert response.status == 200 and response.read(64)
    conn.close()  # hang up mid-stream
    # The next caller is served normally.
    after = runtime.invoke_endpoint(EndpointName="chat", Body=b'{"inputs": "still there?"}')
    assert json.loads(after["Body"].read())["generated_text"] == "echo: still there?"
    # The emulator noticed the caller leave (within the stream's 1 s) and logged it as such, not as a failure.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = _log_records(stack)
        if any(r.get("error") == "ClientDisconnected" for r in records):
            break
        time.sleep(0.1)
    assert any(r.get("error") == "ClientDisconnected" for r in records)
    assert not [r for r in records if r["level"] == "error"]


def test_ping_reports_the_emulator_and_its_variants(stack):
    response = HTTP.request("GET", f"{stack['url']}/ping")

    assert response.status == 200
    endpoints = response.json()["endpoints"]
    assert set(endpoints["ab"]) == {"tuned", "base"}
    assert endpoints["ab"]["tuned"]["weight"] == 0.8


# -------------------------------------------------------------------------------------------- errors


def _error(call) -> ClientError:
    with pytest.raises(ClientError) as excinfo:
        call()
    return excinfo.value


@pytest.mark.parametrize("operation", ["invoke_endpoint", "invoke_endpoint_with_response_stream"])
def test_unknown_endpoint_is_a_validation_error(runtime, operation):
    error = _error(lambda: getattr(runtime, operation)(EndpointName="no-such-endpoint", Body=b"{}"))

    assert error.response["Error"]["Code"] == "ValidationError"
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "Endpoint no-such-endpoint of account" in error.response["Error"]["Message"]


@pytest.mark.parametrize("operation", ["invoke_endpoint", "invoke_endpoint_with_response_stream"])
@pytest.mark.parametrize("status", [400, 413, 500, 503])
def test_container_error_status_is_a_model_error_424(runtime, operation, status):
    body = json.dumps({"status": status, "message": "input too long", "stream": True})

    with pytest.raises(runtime.exceptions.ModelError) as excinfo:
        getattr(runtime, operation)(EndpointName="chat", Body=body)

    response = excinfo.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert response["Error"]["Code"] == "ModelError"
    assert response["OriginalStatusCode"] == status
    assert json.loads(response["OriginalMessage"]) == {"error": "input too long"}
    assert response["LogStreamArn"].startswith("arn:aws:logs:us-east-1:")
    kind = "client" if status < 500 else "server"
    assert response["Error"]["Message"].startswith(f"Received {kind} error ({status}) from primary")


@pytest.mark.parametrize("operation", ["invoke_endpoint", "invoke_endpoint_with_response_stream"])
def test_body_over_6_mb_is_rejected_and_6_mb_is_forwarded(runtime, operation):
    error = _error(lambda: getattr(runtime, operation)(EndpointName="chat", Body=b"x" * (MAX_BODY + 1)))
    assert error.response["Error"]["Code"] == "ValidationError"
    assert "oversize body" in error.response["Error"]["Message"]

    response = runtime.invoke_endpoint(EndpointName="chat", Body=b"x" * MAX_BODY)
    assert json.loads(response["Body"].read())["bytes_received"] == MAX_BODY


def test_no_answer_within_the_timeout_is_a_model_error(runtime):
    started = time.monotonic()
    error = _error(lambda: runtime.invoke_endpoint(EndpointName="chat", Body=b'{"sleep": 3}'))
    elapsed = time.monotonic() - started

    assert error.response["Error"]["Code"] == "ModelError"
    assert "timed out" in error.response["Error"]["Message"]
    assert INVOCATION_TIMEOUT_S <= elapsed < INVOCATION_TIMEOUT_S + 0.9


def test_stream_that_stalls_ends_with_model_stream_error(runtime):
    response = runtime.invoke_endpoint_with_response_stream(
        EndpointName="chat", Body=json.dumps({"stream": True, "stall_after": 2})
    )
    parts = []
    with pytest.raises(EventStreamError) as excinfo:
        for event in response["Body"]:
            parts.append(event["PayloadPart"]["Bytes"])

    assert excinfo.value.response["Error"]["Code"] == "ModelStreamError"
    assert "allotted time" in excinfo.value.response["Error"]["Message"]
    assert len(_sse_events(parts)) == 2  # what came before the stall still arrived, whole


def test_stream_broken_mid_body_ends_with_model_stream_error(runtime):
    response = runtime.invoke_endpoint_with_response_stream(
        EndpointName="chat", Body=json.dumps({"stream": True, "break_after": 2})
    )
    with pytest.raises(EventStreamError) as excinfo:
        for _ in response["Body"]:
            pass

    assert excinfo.value.response["Error"]["Code"] == "ModelStreamError"
    assert "closed before" in excinfo.value.response["Error"]["Message"]


@pytest.mark.parametrize("endpoint", ["ghost", "loading"])
def test_container_that_never_became_ready_is_model_not_ready(runtime, endpoint):
    started = time.monotonic()
    with pytest.raises(runtime.exceptions.ModelNotReadyException) as excinfo:
        runtime.invoke_endpoint(EndpointName=endpoint, Body=b"{}")

    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert "not ready" in excinfo.value.response["Error"]["Message"]
    assert time.monotonic() - started < 1.5  # refused or 503 ping: answered at once, not after a timeout


def test_container_that_went_down_is_a_quick_model_error(stack, runtime):
    assert runtime.invoke_endpoint(EndpointName="doomed", Body=b"{}")["Body"].read()
    stack["doomed"].kill()
    stack["doomed"].wait()

    started = time.monotonic()
    for operation in (runtime.invoke_endpoint, runtime.invoke_endpoint_with_response_stream):
        error = _error(lambda op=operation: op(EndpointName="doomed", Body=b"{}"))
        assert error.response["Error"]["Code"] == "ModelError"
        assert "could not be reached" in error.response["Error"]["Message"]
    assert time.monotonic() - started < 1.5


def test_unknown_target_variant_is_a_validation_error(runtime):
    error = _error(lambda: runtime.invoke_endpoint(EndpointName="ab", Body=b"{}", TargetVariant="canary"))

    assert error.response["Error"]["Code"] == "ValidationError"
    assert "canary" in error.response["Error"]["Message"]


def test_not_emulated_and_unknown_operations_answer_in_the_error_shape(stack):
    response = HTTP.request("POST", f"{stack['url']}/endpoints/chat/async-invocations", body=b"{}")
    assert (response.status, response.headers["x-amzn-ErrorType"]) == (400, "ValidationError")
    response = HTTP.request("GET", f"{stack['url']}/nothing/here")
    assert (response.status, response.headers["x-amzn-ErrorType"]) == (404, "UnknownOperationException")


def test_logs_carry_no_payloads(stack, runtime):
    secret = "my-private-question-0xC0FFEE"
    runtime.invoke_endpoint(EndpointName="chat", Body=json.dumps({"inputs": secret}), CustomAttributes=secret)
    runtime.invoke_endpoint_with_response_stream(EndpointName="chat", Body=json.dumps({"inputs": secret}))
    time.sleep(0.2)

    records = _log_records(stack)
    assert any(r.get("operation") == "InvokeEndpoint" and r.get("endpoint") == "chat" for r in records)
    assert secret not in (stack["log_dir"] / "emulator.log").read_text()


# ------------------------------------------------------------------------------------------ variants


def test_target_variant_picks_the_variant_that_answers(runtime):
    for name in ("base", "tuned"):
        response = runtime.invoke_endpoint(EndpointName="ab", Body=b"{}", TargetVariant=name)
        assert response["InvokedProductionVariant"] == name
        assert json.loads(response["Body"].read())["container"] == name
    stream = runtime.invoke_endpoint_with_response_stream(
        EndpointName="ab", Body=b'{"stream": true}', TargetVariant="base"
    )
    assert stream["InvokedProductionVariant"] == "base"
    assert all(e["token"]["text"].startswith("base-") for e in _sse_events(_stream_parts(stream)))


def test_80_20_split_over_1000_requests(runtime):
    counts = Counter()
    for _ in range(1000):
        response = runtime.invoke_endpoint(EndpointName="ab", Body=b"{}")
        variant = response["InvokedProductionVariant"]
        assert json.loads(response["Body"].read())["container"] == variant  # the header tells the truth
        counts[variant] += 1

    assert 750 <= counts["tuned"] <= 850, counts
    assert counts["tuned"] + counts["base"] == 1000
