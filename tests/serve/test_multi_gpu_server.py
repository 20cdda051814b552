"""One worker per GPU, for real: `containers/serve/serve` with a fake `nvidia-smi` listing two GPUs, on CPU. Each
gunicorn worker must see only its own GPU, /ping must say 503 until both workers' models serve, and a worker that
dies is replaced in its slot, on its GPU, with /ping 503 until the replacement has loaded."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LOAD_DELAY_S = 3.0
WORKER_LINE = re.compile(r"\[(\d+)\] \[INFO\] serve: worker slot (\d) of 2: CUDA_VISIBLE_DEVICES=(\S+),")


def _ready_lines(log: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"\[(\d+)\] \[INFO\] serve\.predictor: model .* ready in", log)}


def _workers(log: str) -> dict[int, tuple[int, str]]:
    """pid -> (slot, CUDA_VISIBLE_DEVICES), as each worker logged them when its app was built."""
    return {int(pid): (int(slot), devices) for pid, slot, devices in WORKER_LINE.findall(log)}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, serve_process):
    tmp = tmp_path_factory.mktemp("multi-gpu")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0, GPU-fake-0, 81559\\n1, GPU-fake-1, 81559\\n'\n")
    smi.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:  # the server must see only the fake GPUs
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        server = serve_process(
            tiny_model_dir,
            tmp,
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            SERVE_LOAD_DELAY_S=str(LOAD_DELAY_S),  # a slow load, so /ping can be watched saying 503
            SERVE_MAX_INPUT_TOKENS="256",
        )
    try:
        yield server
    finally:
        server.stop()


def _poll_ping(server, timeout: float = 120) -> tuple[list[tuple[int | None, bytes]], str]:
    """Ping until 200; every (status, body) seen, and the server's log as it was at the first 200."""
    seen: list[tuple[int | None, bytes]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.output()
        try:
            status, _, body = server.request("GET", "/ping", timeout=2)
        except OSError:
            status, body = None, b""  # not listening yet
        seen.append((status, body))
        if status == 200:
            return seen, server.output()
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s:\n{server.output()}")


def test_one_worker_per_gpu_each_pinned_and_ping_waits_for_both(server):
    seen, log_at_200 = _poll_ping(server)
    assert any(status == 503 for status, _ in seen), seen
    # Both workers' models were ready before the server said so (the log line comes just before the mark).
    _wait_for(lambda: len(_ready_lines(server.output())) == 2, 5, "both workers' ready lines")
    assert "worker placement: " in log_at_200 and "one worker on each" in log_at_200

    workers = _workers(server.output())
    assert sorted(workers.values()) == [(0, "GPU-fake-0"), (1, "GPU-fake-1")], server.output()
    assert _ready_lines(server.output()) == set(workers)
    assert server.generate("hi", max_new_tokens=4)["generated_text"] is not None


def test_a_replaced_worker_keeps_its_gpu_and_ping_waits_for_it(server):
    _poll_ping(server)
    workers = _workers(server.output())
    victim = next(pid for pid, (slot, _) in workers.items() if slot == 1)
    os.kill(victim, signal.SIGKILL)
    # From when the master has reaped it (and cleared its slot): a dead but unreaped worker's mark still stands.
    _wait_for(lambda: f"Worker (pid:{victim}) was sent SIGKILL" in server.output(), 10, "the master to reap it")
    killed = time.monotonic()

    seen, _ = _poll_ping(server)
    took = time.monotonic() - killed
    # The survivor serves, but the server is not whole until the replacement (which sleeps LOAD_DELAY_S before it
    # loads) is: no 200 in between, whichever worker answered.
    assert took >= LOAD_DELAY_S, (took, seen)
    assert all(status in (503, None) for status, _ in seen[:-1]), seen
    bodies = {body for status, body in seen if status == 503}
    print(f"/ping answers while the replacement loaded: {sorted(bodies)}")
    assert bodies <= {
        b'{"error": "the model is loading", "error_type": "not_ready"}',  # the replacement itself
        b'{"error": "the model is loading in 1 of 2 workers", "error_type": "not_ready"}',  # the survivor
    }, bodies

    replacements = {pid: v for pid, v in _workers(server.output()).items() if pid not in workers}
    assert list(replacements.values()) == [(1, "GPU-fake-1")], server.output()


def test_the_readiness_directory_goes_with_the_server(server):
    match = re.search(r"readiness in (\S+)", server.output())
    assert match, server.output()
    ready_dir = Path(match.group(1))
    assert sorted(p.name for p in ready_dir.iterdir()) == ["slot-0", "slot-1"]
    server.stop()
    assert not ready_dir.exists()
