"""Issue 20, serving: a KV token budget per batch, out-of-memory steps that cost one request not the batch, an
error (not an empty answer) for a request that expired in the queue, honest /ping, and cancellation when the
caller hangs up, streaming or not."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch
from serve import create_app
from serve.engine import Engine
from serve.generation import Failed, GenerationError, GenerationHandle, SamplingParams

from .conftest import loaded_predictor, make_config


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


class Recording:
    """Wraps a model's forward: records each call's batch rows and can fail chosen calls."""

    def __init__(self, model, fail=None):
        self.model, self.fail, self.rows, self.calls = model, fail, [], 0
        self.original = model.forward

    def __enter__(self):
        def forward(*args, **kwargs):
            self.calls += 1
            input_ids = kwargs["input_ids"]
            self.rows.append(tuple(input_ids.shape))
            if self.fail is not None and self.fail(self.calls, input_ids):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (planted)")
            return self.original(*args, **kwargs)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        self.model.forward = self.original


def _engine(model, tokenizer, **kwargs) -> Engine:
    return Engine(model, tokenizer, eos_token_ids=[], context_length=256, **kwargs)


def _two_requests(engine, new_tokens=12):
    deadline = time.monotonic() + 60
    first = engine.submit([5, 6, 7, 8], SamplingParams(max_new_tokens=new_tokens), deadline=deadline)
    second = engine.submit([9, 10, 11], SamplingParams(max_new_tokens=new_tokens), deadline=deadline)
    return first, second


def test_out_of_memory_in_a_decode_step_retires_the_newest_and_the_other_goes_on(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = _engine(model, tokenizer)
    first, second = _two_requests(engine)  # queued before the start: one prefill admits both
    once = {"done": False}

    def decode_of_two(_call, input_ids):
        if input_ids.shape == (2, 1) and not once["done"]:
            once["done"] = True
            return True
        return False

    with Recording(model, fail=decode_of_two):
        engine.start()
        result = first.result(30)
        with pytest.raises(GenerationError, match="out of memory"):
            second.result(30)
    engine.stop()
    assert once["done"] and result.generated_tokens == 12 and result.finish_reason == "length"
    assert engine.health() is None or "not running" in engine.health()  # stopped now; it was never unhealthy


def test_out_of_memory_in_a_prefill_fails_the_newest_and_requeues_the_rest(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = _engine(model, tokenizer)
    first, second = _two_requests(engine, new_tokens=4)

    with Recording(model, fail=lambda call, ids: call == 1 and ids.shape[0] == 2) as recording:
        engine.start()
        assert first.result(30).generated_tokens == 4
        with pytest.raises(GenerationError, match="out of memory"):
            second.result(30)
    engine.stop()
    assert recording.rows[0][0] == 2 and recording.rows[1] == (1, 4)  # the survivor prefilled again, alone


def test_the_kv_budget_keeps_a_request_waiting_until_rows_free(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # Each request holds up to 4 + 12 = 16 tokens of cache; two at once (2 x 16) exceed a budget of 20.
    engine = _engine(model, tokenizer, max_batch_total_tokens=20)
    first, second = _two_requests(engine)
    with Recording(model) as recording:
        engine.start()
        results = [first.result(30), second.result(30)]
    engine.stop()
    assert [r.generated_tokens for r in results] == [12, 12]
    assert max(rows for rows, _ in recording.rows) == 1


def test_without_a_budget_both_share_the_batch(model_and_tokenizer):
    """The same two requests, budget large enough: they run side by side (so the test above means something)."""
    model, tokenizer = model_and_tokenizer
    engine = _engine(model, tokenizer, max_batch_total_tokens=64)
    first, second = _two_requests(engine)
    with Recording(model) as recording:
        engine.start()
        first.result(30), second.result(30)
    engine.stop()
    assert max(rows for rows, _ in recording.rows) == 2


def test_a_queue_expiry_is_a_503_with_the_error_shape(predictor):
    """Not a 200 with empty text, which the Lambda would pass on as the model's answer."""

    class Expiring:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def submit(self, prompt_ids, params):
            handle = GenerationHandle()
            handle.put(Failed("waited 61 s in the queue without starting (the server is busy)", True))
            return handle

    client = create_app(predictor.config, predictor=Expiring(predictor)).test_client()
    response = client.post("/invocations", json={"inputs": "hello"})
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.get_json() == {
        "error": "waited 61 s in the queue without starting (the server is busy)",
        "error_type": "queue_timeout",
    }


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the planted exit
def test_ping_is_unhealthy_once_the_engine_thread_is_dead(tiny_model_dir):
    predictor = loaded_predictor(make_config(tiny_model_dir))
    client = create_app(predictor.config, predictor=predictor).test_client()
    assert client.get("/ping").status_code == 200

    def die():
        raise SystemExit("planted: the engine thread exits")

    predictor.engine._step = die
    handle = predictor.submit(predictor.encode_raw("hello"), SamplingParams(max_new_tokens=2))
    with pytest.raises(GenerationError, match="engine stopped"):
        handle.result(10)
    predictor.engine._thread.join(5)
    ping = client.get("/ping")
    assert ping.status_code == 503 and ping.get_json()["error_type"] == "unhealthy", ping.get_data(as_text=True)
    assert "engine" in ping.get_json()["error"]
    invoke = client.post("/invocations", json={"inputs": "hello"})
    assert invoke.status_code == 503 and invoke.get_json()["error_type"] == "unhealthy"


def test_ping_is_unhealthy_while_every_step_fails_and_recovers_after_one_succeeds(tiny_model_dir):
    predictor = loaded_predictor(make_config(tiny_model_dir))
    client = create_app(predictor.config, predictor=predictor).test_client()
    model = predictor.loaded.model
    original = model.forward
    model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("planted: a kernel failed"))
    try:
        for _ in range(3):
            assert client.post("/invocations", json={"inputs": "hello"}).status_code == 424
        ping = client.get("/ping")
        assert ping.status_code == 503 and "the last 3 generation steps failed" in ping.get_json()["error"]
    finally:
        model.forward = original
    # Requests still run while unhealthy: a good one resets the count.
    assert client.post("/invocations", json={"inputs": "hello"}).status_code == 200
    assert client.get("/ping").status_code == 200
    predictor.engine.stop()


# ----- a caller that hangs up frees its batch slot (a real gunicorn server) -----


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, serve_process):
    running = serve_process(
        tiny_model_dir, tmp_path_factory.mktemp("serve"), SERVE_MAX_NEW_TOKENS="4000", SERVE_MAX_INPUT_TOKENS="4096"
    )
    running.wait_ready()
    yield running
    running.stop()


def _hang_up_after(server, body: dict, seconds: float) -> None:
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        time.sleep(seconds)


def _access_line(server, predicate, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.output().splitlines():
            start = line.find('{"method"')
            if start >= 0:
                record = json.loads(line[start:])
                if predicate(record):
                    return record
        time.sleep(0.2)
    raise AssertionError(f"no such access line:\n{server.output()[-3000:]}")


@pytest.mark.parametrize("stream", [False, True], ids=["non_streaming", "streaming"])
def test_a_caller_that_hangs_up_cancels_its_generation(server, stream):
    # The tiny model never stops by itself: 4000 tokens take seconds; the caller leaves after 0.5 s.
    body = {"inputs": f"Tell me everything ({stream})", "parameters": {"max_new_tokens": 4000}, "stream": stream}
    threading.Thread(target=_hang_up_after, args=(server, body, 0.5), daemon=True).start()
    record = _access_line(server, lambda r: r["path"] == "/invocations" and r.get("stream", False) == stream)
    assert record["status"] == 499, record
    assert record.get("finish_reason", "cancelled") == "cancelled" and record["generated_tokens"] < 4000, record
    # Its slot is free: a new request is answered at once.
    assert server.generate("hello", max_new_tokens=2, details=True)["details"]["generated_tokens"] == 2


def test_work_that_cannot_start_in_time_is_refused_at_once(model_and_tokenizer):
    """A burst of long prompts on a slow machine: those the queue cannot start before their deadline get a 429
    now (QueueFull), not a 503 a minute later. The rate comes from the engine's own prefills."""
    from serve.generation import QueueFull

    model, tokenizer = model_and_tokenizer
    engine = _engine(model, tokenizer)  # not started: what is submitted stays queued
    engine._prefill_flops_per_s = engine._cost.flops(200) / 2.0  # a 200-token prompt takes 2 s on this machine
    deadline = time.monotonic() + 14  # half of it, 7 s, may go to waiting
    for _ in range(3):
        engine.submit(list(range(5, 205)), SamplingParams(max_new_tokens=4), deadline=deadline)  # 6 s queued
    with pytest.raises(QueueFull, match="would take about 8 s to read"):
        engine.submit(list(range(5, 205)), SamplingParams(max_new_tokens=4), deadline=deadline)
    engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4), deadline=deadline)  # a short one still fits


def test_prefills_measure_the_rate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = _engine(model, tokenizer)
    engine.start()
    engine.submit(list(range(5, 69)), SamplingParams(max_new_tokens=1), deadline=time.monotonic() + 30).result(30)
    engine.stop()
    assert engine._prefill_flops_per_s and engine._prefill_flops_per_s > 0
    # near-context prompts cost more per token than short ones: attention's n^2 term
    assert engine._cost.flops(2000) / 2000 > engine._cost.flops(20) / 20


def test_a_failed_prefill_leaves_no_work_counted_ahead(model_and_tokenizer):
    """After a prefill that failed (not out of memory), nothing of it stays in the wait estimate or the queue."""
    model, tokenizer = model_and_tokenizer
    engine = _engine(model, tokenizer)
    first, second = _two_requests(engine)

    def fail_first_call(call, _ids):
        if call == 1:
            raise RuntimeError("planted: a kernel failed")
        return False

    with Recording(model, fail=fail_first_call):
        engine.start()
        for handle in (first, second):
            with pytest.raises(GenerationError, match="planted"):
                handle.result(30)
    engine.stop()
    assert engine._prefilling == [] and engine._pending == 0
