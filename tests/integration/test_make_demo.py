"""`make demo` as a newcomer runs it: start it, wait for the page, ask through API Gateway, press Ctrl-C.

Ctrl-C is SIGINT to the whole foreground process group, as a terminal sends it; afterwards no process the
demo started may be left and every port it bound must be free. Run in the checkout itself, on the real
embedded model and sample data (the first run converts the embedded GGUF model, about a minute more).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import astuple
from pathlib import Path

import psutil
import pytest
from stack_runner.__main__ import REPO, RUNS_DIR, Ports

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 600  # training on 2 cores, plus the GGUF conversion when the cache is cold
STOP_TIMEOUT_S = 90  # the runner's own grace period is 30 s per process group, in parallel


class Demo:
    """`make demo` in its own process group, its output in a file the test reads as it grows."""

    def __init__(self, log: Path):
        self.log = log
        self.runs_before = set(RUNS_DIR.glob("demo-*")) if RUNS_DIR.exists() else set()
        self.process = subprocess.Popen(
            ["make", "demo"],
            cwd=REPO,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.descendants: list[psutil.Process] = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output()):
                return
            if self.process.poll() is not None:
                break
            time.sleep(1)
        pytest.fail(f"`make demo` never printed {pattern!r}:\n{self.output()[-4000:]}")

    def remember_processes(self) -> None:
        self.descendants = psutil.Process(self.process.pid).children(recursive=True)

    def ctrl_c(self) -> int:
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=STOP_TIMEOUT_S)

    def leftovers(self) -> list[str]:
        alive = []
        for p in self.descendants:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        return alive

    def new_runs(self) -> list[Path]:
        return sorted(set(RUNS_DIR.glob("demo-*")) - self.runs_before)

    def kill(self) -> None:
        """Whatever went wrong, leave nothing behind for the next test."""
        if self.process.poll() is None:
            # Services run in sessions of their own, out of reach of killpg: a stack that never came up has no
            # remembered processes yet, so take them now.
            with contextlib.suppress(psutil.NoSuchProcess):
                self.descendants += psutil.Process(self.process.pid).children(recursive=True)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for p in self.descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def ports_in_use() -> list[int]:
    busy = []
    for port in astuple(Ports()):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def ask_through_api_gateway(question: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{Ports().apigw}/prod/ask",
        data=json.dumps({"question": question}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture
def demo(tmp_path):
    if busy := ports_in_use():
        pytest.fail(f"ports {busy} are taken on this machine; `make demo` needs them free")
    running = Demo(tmp_path / "make-demo.log")
    try:
        yield running
    finally:
        running.kill()
        for run in running.new_runs():  # the checkout keeps only what its user made
            subprocess.run(["rm", "-rf", str(run)], check=False)


def test_page_answers_then_ctrl_c_during_evaluation_stops_everything(demo):
    demo.wait_for(r"The stack is up\. Open http://127\.0\.0\.1:8000", STARTUP_TIMEOUT_S)
    with urllib.request.urlopen(f"http://127.0.0.1:{Ports().web}/", timeout=10) as page:
        assert b"<html" in page.read().lower()
    answer = ask_through_api_gateway("What does make demo do?")
    assert answer["answer"].strip() and answer["variant"] == "tuned", answer

    demo.wait_for(r"Evaluating the base and the tuned model in the background", 30)
    demo.remember_processes()
    assert any("containers/train/evaluate" in " ".join(p.cmdline()) for p in demo.descendants)
    demo.ctrl_c()

    assert demo.leftovers() == []
    assert ports_in_use() == []
    assert "stopping the stack" in demo.output()
    [run] = demo.new_runs()
    assert (run / "model" / "manifest.json").exists()  # the artifact was complete before the page came up
    assert not (run / "output" / "failure").exists()  # an interrupted evaluation is no failed training job


def test_ctrl_c_during_training_stops_everything(demo):
    demo.wait_for(r"started train \(pid \d+\)", STARTUP_TIMEOUT_S)
    demo.wait_for(r"'loss'|metrics: ", STARTUP_TIMEOUT_S)  # a few optimizer steps in
    demo.remember_processes()
    assert any("containers/train/train" in " ".join(p.cmdline()) for p in demo.descendants)
    demo.ctrl_c()

    assert demo.leftovers() == []
    assert ports_in_use() == []
    [run] = demo.new_runs()
    # The job was stopped as SageMaker stops one (SIGTERM): a checkpoint to resume from, and the reason.
    assert "TrainingInterrupted" in (run / "output" / "failure").read_text()
    assert list((run / "checkpoints").glob("checkpoint-*"))
