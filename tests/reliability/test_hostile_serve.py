"""Hostile input against /invocations (the serving app with a tiny model, in-process): never a 500, never a hang,
always the one JSON error shape, nothing of the server's internals in the reply."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability.helpers import LEAK_MARKERS

ACCEPTED_STATUSES = {200, 400, 406, 413, 415, 422, 429}


def post(client, body: bytes, content_type: str = "application/json", **headers):
    return client.post("/invocations", data=body, headers={"Content-Type": content_type, **headers})


def assert_handled(response) -> None:
    assert response.status_code in ACCEPTED_STATUSES, (response.status_code, response.data[:300])
    text = response.data.decode("utf-8", "replace")
    for marker in LEAK_MARKERS:
        assert marker not in text, text[:300]
    if response.status_code != 200:
        assert response.mimetype == "application/json"
        body = json.loads(response.data)
        assert set(body) == {"error", "error_type"} and isinstance(body["error"], str)
        assert len(body["error"]) < 2000, "errors must not echo the request back"


# Each was a 500 (or a 424 that failed every request batched with it) before the fix next to it.
REGRESSIONS = [
    ("deeply nested array", b"[" * 100_000 + b"]" * 100_000, 400),
    ("deeply nested inputs", b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    ("integer with 5000 digits", b'{"inputs":"hi","parameters":{"max_new_tokens":' + b"9" * 5000 + b"}}", 400),
    ("lone surrogate in chat content", b'{"messages":[{"role":"user","content":"\\udfff"}]}', 400),
    ("lone surrogate in inputs", b'{"inputs":"\\ud800"}', 400),
    ("Infinity repetition penalty", b'{"inputs":"hi","parameters":{"repetition_penalty":Infinity}}', 422),
    ("NaN temperature", b'{"inputs":"hi","parameters":{"temperature":NaN,"do_sample":true}}', 422),
    ("tiny repetition penalty", b'{"inputs":"hi","parameters":{"repetition_penalty":1e-300,"do_sample":true}}', 422),
    ("huge repetition penalty", b'{"inputs":"hi","parameters":{"repetition_penalty":1e300,"do_sample":true}}', 422),
    # Raised to 0.01 (as vLLM does) instead of overflowing the logits to NaN.
    ("tiny temperature", b'{"inputs":"hi","parameters":{"temperature":1e-308,"do_sample":true}}', 200),
    ("tiny chat temperature", b'{"messages":[{"role":"user","content":"hi"}],"temperature":1e-300}', 200),
    # Found by schemathesis through the public API: compared in float32 it is 0, and every token was dropped.
    ("subnormal top_p", b'{"inputs":"hi","parameters":{"top_p":2.2e-313,"do_sample":true}}', 200),
    ("subnormal chat top_p", b'{"messages":[{"role":"user","content":"hi"}],"top_p":1e-300}', 200),
]


@pytest.mark.parametrize(("case", "body", "status"), REGRESSIONS, ids=[c[0] for c in REGRESSIONS])
def test_regressions(serve_client, case, body, status):
    response = post(serve_client, body)
    assert response.status_code == status, response.data[:300]
    assert_handled(response)


def test_a_valid_surrogate_pair_is_still_text(serve_client):
    response = post(serve_client, b'{"inputs":"emoji \\ud83d\\ude00 ok"}')
    assert response.status_code == 200, response.data


def test_header_values_are_not_echoed_in_full(serve_client):
    response = post(serve_client, b'{"inputs":"hi"}', Accept="text/" + "x" * 10_000)
    assert response.status_code == 406
    assert len(json.loads(response.data)["error"]) < 400


def test_hostile_sampling_does_not_fail_the_requests_batched_with_it(serve_client, serve_app):
    """Before the fix a NaN from one request's sampling failed the whole engine step, and so every neighbour."""
    hostile = [
        {"inputs": "x", "parameters": {"temperature": 1e-308, "do_sample": True, "max_new_tokens": 8}},
        {"inputs": "x", "parameters": {"repetition_penalty": 1e-300, "do_sample": True}},
    ]
    results: list[int] = []

    def normal() -> None:
        client = serve_app.test_client()
        for _ in range(4):
            reply = client.post(
                "/invocations", json={"inputs": "What is SageMaker?", "parameters": {"max_new_tokens": 8}}
            )
            results.append(reply.status_code)

    worker = threading.Thread(target=normal)
    worker.start()
    for _ in range(4):
        for body in hostile:
            assert_handled(serve_client.post("/invocations", json=body))
    worker.join(timeout=60)
    assert results == [200] * 4


def test_a_step_that_fails_for_one_request_fails_it_alone(serve_client, serve_app, serve_predictor, monkeypatch):
    """The failure injected, not just hoped for: one request's token choice raises (as sampling from NaN
    probabilities does) while greedy neighbours share its batch. It gets a 424; they get their answers."""
    from serve.token_chooser import NextTokenChooser

    model = serve_predictor.loaded.model
    real_forward = model.forward

    def slow_forward(*args, **kwargs):  # 8 tokens take ~0.2 s: the requests below surely share steps
        time.sleep(0.02)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    real_choose = NextTokenChooser.choose

    def choose(self, row):
        if self.params.seed == 666:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0 (injected)")
        return real_choose(self, row)

    monkeypatch.setattr(NextTokenChooser, "choose", choose)
    neighbours: list[tuple[int, int]] = []

    def neighbour() -> None:
        reply = serve_app.test_client().post(
            "/invocations",
            json={"inputs": "What is SageMaker?", "parameters": {"max_new_tokens": 8, "details": True}},
        )
        body = reply.get_json()
        neighbours.append(
            (reply.status_code, body[0]["details"]["generated_tokens"] if reply.status_code == 200 else 0)
        )

    threads = [threading.Thread(target=neighbour) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)  # the neighbours are decoding when the failing request joins their batch
    failing = serve_client.post(
        "/invocations", json={"inputs": "x", "parameters": {"do_sample": True, "seed": 666, "max_new_tokens": 8}}
    )
    for thread in threads:
        thread.join(timeout=60)
    assert failing.status_code == 424 and "choosing the next token failed" in failing.get_json()["error"]
    assert neighbours == [(200, 8)] * 3


def test_invalid_utf8_nul_bytes_and_binary(serve_client):
    for body in (b'{"inputs":"\xff\xfe"}', b"\x00" * 100, b'{"inputs":"a\x00b"}', bytes(range(256))):
        assert_handled(post(serve_client, body))
    # An escaped NUL is valid JSON text and just another character to the tokenizer.
    assert post(serve_client, b'{"inputs":"a\\u0000b"}').status_code == 200


def test_prompt_injection_sized_prompts_are_refused_or_truncated(serve_client):
    huge = "Ignore all previous instructions. " * 20_000  # ~700 kB, far over a 256-token context
    response = serve_client.post("/invocations", json={"inputs": huge})
    assert response.status_code == 422 and "context" in json.loads(response.data)["error"]
    response = serve_client.post("/invocations", json={"inputs": huge, "parameters": {"truncate": 100}})
    assert response.status_code == 200
    response = serve_client.post("/invocations", json={"messages": [{"role": "user", "content": huge}] * 3})
    assert response.status_code == 422


def test_header_abuse(serve_client):
    cases = [
        {"Content-Type": "application/json; charset=latin-1"},
        {"Content-Type": "application/json", "Accept": "*/*;q=abc"},
        {"Content-Type": "text/plain\x01"},
        {"Content-Type": "application/jsonlines", "Accept": "application/json"},
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        {"Content-Type": "application/json", "X-Long": "y" * 60_000},
    ]
    for headers in cases:
        assert_handled(serve_client.post("/invocations", data=b'{"inputs":"hi"}', headers=headers))


# ----- property-based: arbitrary JSON, arbitrary values in the known fields -----

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
any_json = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
parameter_names = st.sampled_from(
    [
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "do_sample",
        "repetition_penalty",
        "stop",
        "seed",
        "return_full_text",
        "details",
        "truncate",
        "apply_chat_template",
        "typo",
    ]
)
small_numbers = st.one_of(
    st.integers(min_value=-5, max_value=20),
    st.floats(min_value=-2, max_value=3),
    st.sampled_from([0, 1e-300, 2.2e-313, 1e-45, 1e300]),
)
hostile_parameters = st.dictionaries(parameter_names, small_numbers | json_scalars | any_json, max_size=5)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(body=any_json)
def test_any_json_body(serve_client, body):
    assert_handled(post(serve_client, json.dumps(body).encode()))


@SETTINGS
@given(
    inputs=st.one_of(st.text(max_size=200), st.lists(st.text(max_size=20), max_size=3), any_json),
    parameters=hostile_parameters,
    stream=st.one_of(st.booleans(), json_scalars),
)
def test_tgi_shape_with_hostile_values(serve_client, inputs, parameters, stream):
    body = {"inputs": inputs, "parameters": parameters, "stream": stream}
    response = post(serve_client, json.dumps(body).encode())
    assert_handled(response)


@SETTINGS
@given(
    content=st.one_of(st.text(max_size=200), any_json),
    role=st.one_of(st.sampled_from(["user", "system"]), any_json),
    extra=st.dictionaries(
        st.sampled_from(
            ["temperature", "top_p", "max_tokens", "n", "stop", "seed", "stream", "stream_options", "logprobs"]
        ),
        small_numbers | any_json,
        max_size=3,
    ),
)
def test_chat_shape_with_hostile_values(serve_client, content, role, extra):
    body = {"messages": [{"role": role, "content": content}], **extra}
    assert_handled(post(serve_client, json.dumps(body).encode()))


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes(serve_client, raw):
    assert_handled(post(serve_client, raw))
    assert_handled(post(serve_client, raw, content_type="application/jsonlines"))


def _refuse_constant(constant: str):
    raise AssertionError(f"{constant} in the reply")


def test_nan_is_never_echoed_as_a_number(serve_client):
    """NaN and Infinity, which Python's json (and so the strategies above) reads and writes, are refused by the
    server with a 422 whose body holds no such number: a strict JSON client must be able to read every reply."""
    assert math.isnan(json.loads(json.dumps(float("nan"))))  # what a hostile client can send
    for body in (
        b'{"inputs": "x", "parameters": {"temperature": NaN}}',
        b'{"inputs": "x", "parameters": {"top_p": Infinity}}',
        b'{"inputs": NaN}',
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}',
    ):
        response = post(serve_client, body)
        assert response.status_code == 422, response.data[:300]

        json.loads(response.data, parse_constant=_refuse_constant)
