"""The real thing: `containers/serve/serve` (gunicorn + gthread workers) on a loopback port, over HTTP."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow

Q = "What solutions come pre-built with Amazon SageMaker JumpStart?"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, serve_process):
    server = serve_process(
        tiny_model_dir,
        tmp_path_factory.mktemp("server"),
        SERVE_LOAD_DELAY_S="3",  # a slow load, so /ping can be seen saying 503 first
        SERVE_MAX_BATCH_SIZE="8",
        SERVE_MAX_INPUT_TOKENS="256",
        SERVE_MAX_NEW_TOKENS="512",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_ping_is_503_during_a_slow_load_then_200(server):
    answered = [s for s in server.pings if s is not None]
    assert 503 in answered, server.pings
    assert answered[-1] == 200
    assert answered.index(200) > answered.index(503)
    # Once up, pings are 200 with an empty body.
    assert server.request("GET", "/ping")[::2] == (200, b"")


def _raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


ERROR_CASES = [
    ("malformed JSON", b'{"inputs": ', "application/json", {}, 400, "bad_request"),
    ("unsupported content type", b"a,b", "text/csv", {}, 415, "unsupported_media_type"),
    (
        "unsatisfiable accept",
        json.dumps({"inputs": "hi"}).encode(),
        "application/json",
        {"Accept": "text/csv"},
        406,
        "not_acceptable",
    ),
    (
        "bad temperature",
        json.dumps({"inputs": "hi", "parameters": {"temperature": -1}}).encode(),
        "application/json",
        {},
        422,
        "validation",
    ),
    (
        "top_p out of range",
        json.dumps({"inputs": "hi", "parameters": {"top_p": 0}}).encode(),
        "application/json",
        {},
        422,
        "validation",
    ),
    (
        "max_new_tokens over the cap",
        json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 513}}).encode(),
        "application/json",
        {},
        422,
        "validation",
    ),
    (
        "five stop strings",
        json.dumps({"inputs": "hi", "parameters": {"stop": list("abcde")}}).encode(),
        "application/json",
        {},
        422,
        "validation",
    ),
    (
        "wrong type",
        json.dumps({"inputs": "hi", "parameters": {"seed": "x"}}).encode(),
        "application/json",
        {},
        422,
        "validation",
    ),
    (
        "prompt over the context",
        json.dumps({"inputs": "x" * 400}).encode(),
        "application/json",
        {},
        422,
        "validation",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "content_type", "headers", "status", "error_type"),
    ERROR_CASES,
    ids=[c[0] for c in ERROR_CASES],
)
def test_error_cases_over_http(server, case, body, content_type, headers, status, error_type):
    got, response_headers, raw = server.request("POST", "/invocations", body, {"Content-Type": content_type, **headers})
    assert got == status, raw
    assert response_headers["Content-Type"] == "application/json"
    assert json.loads(raw)["error_type"] == error_type


def test_body_over_6_mb_is_413_without_reading_it(server):
    head = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (7 * 1024 * 1024)
    )
    reply = _raw_request(server.port, head, b"x" * 65536)
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 413 " in status_line
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error_type"] == "payload_too_large"


def test_a_client_that_sends_the_whole_7_mb_body_first_still_reads_the_413(server):
    """Issue 20, item 9: urllib writes the whole body before it reads; the server used to answer and close at
    once, and the client saw a broken pipe instead of the 413."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/invocations",
        data=b"x" * (7 * 1024 * 1024),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    assert json.loads(caught.value.read())["error_type"] == "payload_too_large"


def test_stream_is_chunked_one_frame_per_chunk_over_a_socket(server):
    expected = server.generate(Q, max_new_tokens=20)["generated_text"]
    body = json.dumps({"inputs": Q, "stream": True, "parameters": {"max_new_tokens": 20, "details": True}}).encode()
    head = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        reader = sock.makefile("rb")
        status = reader.readline()
        assert b" 200 " in status
        headers = {}
        while (line := reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["transfer-encoding"] == "chunked"
        frames = []
        while True:  # read the chunked body chunk by chunk: each chunk must be exactly one SSE frame
            size = int(reader.readline().strip(), 16)
            if size == 0:
                break
            chunk = reader.read(size)
            assert reader.read(2) == b"\r\n"
            text = chunk.decode()
            assert text.startswith("data: ") and text.endswith("\n\n") and text.count("data: ") == 1, text
            frames.append(json.loads(text.removeprefix("data: ")))
    assert len(frames) == 20
    assert all(f["generated_text"] is None for f in frames[:-1])
    assert frames[-1]["generated_text"] == expected
    assert frames[-1]["details"]["finish_reason"] == "length"


def test_32_concurrent_requests_all_answered_like_one_at_a_time(server):
    prompts = [Q, "hello", "How do I deploy a model?", "What is a training job?"]
    singles = {p: server.generate(p, max_new_tokens=24)["generated_text"] for p in prompts}
    work = [prompts[i % len(prompts)] for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda p: server.generate(p, max_new_tokens=24)["generated_text"], work))
    assert answers == [singles[p] for p in work]


def test_chat_and_jsonlines_over_http(server):
    status, _, raw = server.request(
        "POST",
        "/invocations",
        {"messages": [{"role": "user", "content": Q}], "max_tokens": 4, "temperature": 0},
    )
    assert status == 200 and json.loads(raw)["object"] == "chat.completion"
    lines = b"\n".join(json.dumps({"inputs": p, "parameters": {"max_new_tokens": 3}}).encode() for p in ("a", "b"))
    status, headers, raw = server.request("POST", "/invocations", lines, {"Content-Type": "application/jsonlines"})
    assert status == 200 and headers["Content-Type"] == "application/jsonlines"
    assert len(raw.decode().splitlines()) == 2
    status, _, raw = server.request("GET", "/execution-parameters")
    assert status == 200 and json.loads(raw)["BatchStrategy"] == "MULTI_RECORD"


def test_access_log_lines_are_json(server):
    server.generate("a private question", max_new_tokens=2)
    time.sleep(0.2)
    records = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"method"')]
    assert any(r["path"] == "/invocations" and r["status"] == 200 and r["generated_tokens"] == 2 for r in records)
    assert "private" not in server.output()


def test_sigterm_drains_in_flight_requests_then_exits(tiny_model_dir, tmp_path, serve_process):
    server = serve_process(tiny_model_dir, tmp_path, SERVE_MAX_BATCH_SIZE="3", SERVE_MAX_QUEUE="3")
    try:
        server.wait_ready()
        results: dict[int, tuple] = {}

        def long_request(i):
            results[i] = server.request(
                "POST",
                "/invocations",
                {"inputs": f"q{i}", "parameters": {"max_new_tokens": 900, "details": True}},
            )

        # A stream tells us when generation is under way; two plain requests run beside it.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request(
            "POST",
            "/invocations",
            json.dumps({"inputs": "s", "stream": True, "parameters": {"max_new_tokens": 900}}),
            {"Content-Type": "application/json"},
        )
        stream = conn.getresponse()
        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert stream.readline().startswith(b"data: ")
        time.sleep(0.3)
        # The queue (3) is full: a fourth request is refused at once, not left hanging.
        started = time.monotonic()
        status, _, raw = server.request("POST", "/invocations", {"inputs": "more"})
        assert status == 429 and json.loads(raw)["error_type"] == "overloaded"
        assert time.monotonic() - started < 2

        server.proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        rest = stream.read().decode()
        for t in threads:
            t.join(timeout=40)
        assert server.proc.wait(timeout=30) == 0
        assert time.monotonic() - sigterm_at < 30
        final = json.loads(rest.strip().split("\n\n")[-1].removeprefix("data: "))
        assert final["generated_text"] is not None
        for status, _, raw in results.values():
            assert status == 200, raw
            assert json.loads(raw)[0]["details"]["generated_tokens"] > 0
        assert len(results) == 2
    finally:
        server.stop()
