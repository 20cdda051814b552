"""One Lambda execution environment: a Runtime API server of ours plus the real runtime interface client.

The function process is `python -m awslambdaric <handler>` -- the same client AWS's Python base images run --
with AWS_LAMBDA_RUNTIME_API pointing at this environment's own Runtime API server (its own loopback port, so
several environments can run side by side and each knows which process holds which invocation).

Runtime API routes served (https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html):
    GET  /2018-06-01/runtime/invocation/next                 long-poll; event + Lambda-Runtime-* headers
    POST /2018-06-01/runtime/invocation/{requestId}/response 202
    POST /2018-06-01/runtime/invocation/{requestId}/error    202 (function error)
    POST /2018-06-01/runtime/init/error                      202 (init failed; the process then exits)
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, Response, request
from werkzeug.serving import make_server

# Lambda gives a function's init phase 10 s (on-demand); the invoke timeout starts when the runtime takes the
# event from /next, so a slow cold start does not eat the function's own timeout.
INIT_TIMEOUT_S = 10.0
RUNTIME_API_PREFIX = "/2018-06-01/runtime"


@dataclass(frozen=True)
class FunctionSpec:
    handler: str
    task_root: Path
    function_name: str = "qa-function"
    timeout_s: float = 29.0
    memory_mb: int = 256
    region: str = "us-east-1"
    account_id: str = "123456789012"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account_id}:function:{self.function_name}"


@dataclass
class InvokeResult:
    payload: bytes
    function_error: str | None = None  # "Unhandled" when the function failed, timed out or crashed
    request_id: str = ""
    init_duration_ms: float | None = None
    duration_ms: float = 0.0


@dataclass
class Invocation:
    payload: bytes
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    trace_id: str = field(default_factory=lambda: f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]}")
    deadline_ms: int = 0
    started_at: float = 0.0
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: InvokeResult | None = None

    def finish(self, payload: bytes, function_error: str | None = None) -> None:
        if not self.done.is_set():
            self.result = InvokeResult(payload, function_error, request_id=self.request_id)
            self.done.set()
            self.started.set()  # wakes a waiter still in the init phase (init error, crash)


def _failure(request_id: str, detail: str) -> str:
    return f"RequestId: {request_id} Error: {detail}"


def _error_payload(error_type: str, message: str) -> bytes:
    return json.dumps({"errorType": error_type, "errorMessage": message}).encode()


class ExecutionEnvironment:
    """Serves one invocation at a time, like a real Lambda execution environment."""

    def __init__(self, spec: FunctionSpec):
        self.spec = spec
        self._pending: queue.Queue[Invocation] = queue.Queue()
        self._current: Invocation | None = None
        self._init_error: bytes | None = None
        self._closed = threading.Event()
        self._created = time.monotonic()
        self.init_duration_ms: float | None = None  # set when the runtime first asks for work
        self._server = make_server("127.0.0.1", 0, self._runtime_api(), threaded=True)
        self._server_thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._server_thread.start()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "awslambdaric", spec.handler],
            env=self._function_env(),
            cwd=spec.task_root,
        )
        threading.Thread(target=self._watch_process, daemon=True).start()

    @property
    def runtime_api_address(self) -> str:
        return f"127.0.0.1:{self._server.server_port}"

    @property
    def alive(self) -> bool:
        return not self._closed.is_set() and self._process.poll() is None

    def _function_env(self) -> dict[str, str]:
        spec = self.spec
        env = dict(os.environ)
        env.update(
            {
                "AWS_LAMBDA_RUNTIME_API": self.runtime_api_address,
                "AWS_LAMBDA_FUNCTION_NAME": spec.function_name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.function_name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": f"{time.strftime('%Y/%m/%d')}/[$LATEST]{uuid.uuid4().hex}",
                "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
                "LAMBDA_TASK_ROOT": str(spec.task_root),
                "AWS_REGION": env.get("AWS_REGION", spec.region),
                "AWS_DEFAULT_REGION": env.get("AWS_DEFAULT_REGION", env.get("AWS_REGION", spec.region)),
                # Like /var/task in Lambda: the function's code is importable, the emulator's own code is not.
                "PYTHONPATH": str(spec.task_root),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(spec.extra_env)
        return env

    def invoke(self, payload: bytes) -> InvokeResult:
        invocation = Invocation(payload=payload)
        self._current = invocation
        self._pending.put(invocation)
        if not invocation.started.wait(INIT_TIMEOUT_S) and not invocation.done.is_set():
            self.close()
            invocation.finish(
                _error_payload(
                    "Runtime.InitTimeout",
                    _failure(invocation.request_id, f"init did not finish in {INIT_TIMEOUT_S:.0f} s"),
                ),
                "Unhandled",
            )
        if not invocation.done.wait(self.spec.timeout_s + 0.05):
            # Lambda stops the environment on timeout; the next invocation gets a fresh (cold) one.
            self.close()
            invocation.finish(
                _error_payload(
                    "Sandbox.Timedout",
                    _failure(invocation.request_id, f"Task timed out after {self.spec.timeout_s:.2f} seconds"),
                ),
                "Unhandled",
            )
        result = invocation.result
        assert result is not None
        # Like Lambda's REPORT line: Duration counts from the hand-over to the runtime, init is separate.
        result.duration_ms = (time.monotonic() - (invocation.started_at or time.monotonic())) * 1000
        result.init_duration_ms = self.init_duration_ms
        self._current = None
        return result

    def request_id_in_flight(self) -> str | None:
        current = self._current
        return current.request_id if current else None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._server.shutdown()

    def _watch_process(self) -> None:
        code = self._process.wait()
        if not self._closed.is_set():
            current = self._current
            if current is not None:
                if self._init_error is not None:
                    current.finish(self._init_error, "Unhandled")
                else:
                    current.finish(
                        _error_payload(
                            "Runtime.ExitError",
                            _failure(current.request_id, f"Runtime exited with error: exit status {code}"),
                        ),
                        "Unhandled",
                    )
            self.close()

    def _runtime_api(self) -> Flask:
        app = Flask(f"runtime-api-{id(self)}")
        env = self

        @app.get(f"{RUNTIME_API_PREFIX}/invocation/next")
        def next_invocation():
            if env.init_duration_ms is None:
                env.init_duration_ms = (time.monotonic() - env._created) * 1000
            while not env._closed.is_set():
                try:
                    invocation = env._pending.get(timeout=0.5)
                except queue.Empty:
                    continue
                invocation.deadline_ms = int(time.time() * 1000 + env.spec.timeout_s * 1000)
                invocation.started_at = time.monotonic()
                invocation.started.set()
                return Response(
                    invocation.payload,
                    headers={
                        "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                        "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
                        "Lambda-Runtime-Invoked-Function-Arn": env.spec.arn,
                        "Lambda-Runtime-Trace-Id": invocation.trace_id,
                    },
                    content_type="application/json",
                )
            return Response(status=410)

        @app.post(f"{RUNTIME_API_PREFIX}/invocation/<request_id>/response")
        def invocation_response(request_id: str):
            invocation = env._current
            if invocation is None or invocation.request_id != request_id or invocation.done.is_set():
                return _runtime_error(400, "InvalidRequestID", f"Unknown or finished request id {request_id}")
            invocation.finish(request.get_data())
            return {"status": "OK"}, 202

        @app.post(f"{RUNTIME_API_PREFIX}/invocation/<request_id>/error")
        def invocation_error(request_id: str):
            invocation = env._current
            if invocation is None or invocation.request_id != request_id or invocation.done.is_set():
                return _runtime_error(400, "InvalidRequestID", f"Unknown or finished request id {request_id}")
            invocation.finish(request.get_data() or _error_payload("Unknown", "no error body"), "Unhandled")
            return {"status": "OK"}, 202

        @app.post(f"{RUNTIME_API_PREFIX}/init/error")
        def init_error():
            env._init_error = request.get_data() or _error_payload("Runtime.Unknown", "init failed")
            return {"status": "OK"}, 202

        return app


def _runtime_error(status: int, error_type: str, message: str):
    return {"errorType": error_type, "errorMessage": message}, status
