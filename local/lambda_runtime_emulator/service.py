"""The Lambda Invoke API in front of a pool of execution environments.

Speaks enough of the real service that `boto3.client("lambda").invoke(...)` and `aws lambda invoke` work with
AWS_ENDPOINT_URL_LAMBDA pointing here (and the AWS Lambda RIE's URL works too):

    POST /2015-03-31/functions/{name}/invocations   X-Amz-Invocation-Type: RequestResponse | Event | DryRun
        200 payload; a failed function is still 200 with X-Amz-Function-Error: Unhandled (like Lambda)
        413 RequestEntityTooLargeException   payload over 6 MB (Lambda's synchronous limit), declared or
                                             chunked: at most 6 MB + 1 byte is read before the answer
        429 TooManyRequestsException         every environment busy (reserved concurrency reached)
        404 ResourceNotFoundException        unknown function name
    GET  /_emulator/health                      {"status": "ok", ...} for compose health checks
"""

from __future__ import annotations

import json
import threading
from typing import Any

from apigw_emulator.app import read_at_most  # one bounded reader for both emulators' bodies
from flask import Flask, Response, request

from lambda_runtime_emulator.environment import ExecutionEnvironment, FunctionSpec, InvokeResult

MAX_SYNC_PAYLOAD_BYTES = 6 * 1024 * 1024  # Lambda's synchronous invoke limit, request and response
RIE_FUNCTION_NAME = "function"  # the AWS Lambda RIE's only route: /2015-03-31/functions/function/invocations


class EnvironmentPool:
    """Up to `max_concurrency` environments, reused while warm; a crashed or timed-out one is replaced."""

    def __init__(self, spec: FunctionSpec, max_concurrency: int):
        self.spec = spec
        self.max_concurrency = max_concurrency
        self._idle: list[ExecutionEnvironment] = []
        self._all: set[ExecutionEnvironment] = set()  # busy ones too, so close() stops every process
        self._busy = 0
        self._lock = threading.Lock()
        self.cold_starts = 0

    def acquire(self) -> ExecutionEnvironment | None:
        with self._lock:
            while self._idle:
                env = self._idle.pop()
                if env.alive:
                    self._busy += 1
                    return env
                self._all.discard(env)
            if self._busy >= self.max_concurrency:
                return None
            self._busy += 1
            self.cold_starts += 1
        try:
            env = ExecutionEnvironment(self.spec)
        except Exception:
            with self._lock:
                self._busy -= 1
            raise
        with self._lock:
            self._all.add(env)
        return env

    def release(self, env: ExecutionEnvironment) -> None:
        with self._lock:
            self._busy -= 1
            if env.alive:
                self._idle.append(env)
            else:
                self._all.discard(env)

    def prewarm(self) -> None:
        env = self.acquire()
        if env is not None:
            self.release(env)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"busy": self._busy, "idle": len(self._idle), "cold_starts": self.cold_starts}

    def close(self) -> None:
        with self._lock:
            envs, self._idle, self._all = list(self._all), [], set()
        for env in envs:
            env.close()


def _aws_error(status: int, error_type: str, message: str, **extra: Any) -> Response:
    response = Response(
        _json({"Type": "User", "message": message, **extra}), status=status, content_type="application/json"
    )
    response.headers["x-amzn-ErrorType"] = error_type
    return response


def _json(value: Any) -> str:
    return json.dumps(value)


def create_app(pool: EnvironmentPool, log=print) -> Flask:
    app = Flask("lambda_runtime_emulator")
    spec = pool.spec

    @app.get("/_emulator/health")
    def health():
        return {"status": "ok", "function": spec.function_name, **pool.stats()}

    @app.post("/2015-03-31/functions/<path:name>/invocations")
    def invoke(name: str):
        if name not in (spec.function_name, spec.arn, RIE_FUNCTION_NAME):
            return _aws_error(
                404,
                "ResourceNotFoundException",
                f"Function not found: {spec.arn[: -len(spec.function_name)]}{name}",
            )
        invocation_type = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if invocation_type == "DryRun":
            return Response(status=204)
        if invocation_type not in ("RequestResponse", "Event"):
            return _aws_error(400, "InvalidParameterValueException", f"Unsupported invocation type {invocation_type}")
        length = request.content_length or 0
        payload = None if length > MAX_SYNC_PAYLOAD_BYTES else read_at_most(request.stream, MAX_SYNC_PAYLOAD_BYTES)
        if payload is None:
            return _aws_error(
                413,
                "RequestEntityTooLargeException",
                f"Request must be smaller than {MAX_SYNC_PAYLOAD_BYTES} bytes for the InvokeFunction operation",
            )
        payload = payload or b"{}"

        env = pool.acquire()
        if env is None:
            return _aws_error(
                429,
                "TooManyRequestsException",
                "Rate Exceeded.",
                Reason="ReservedFunctionConcurrentInvocationLimitExceeded",
            )
        if invocation_type == "Event":
            threading.Thread(target=_run, args=(pool, env, payload, log), daemon=True).start()
            return Response(status=202)
        result = _run(pool, env, payload, log)
        headers = {"X-Amz-Executed-Version": "$LATEST"}
        if result.function_error:
            headers["X-Amz-Function-Error"] = result.function_error
        return Response(result.payload, status=200, headers=headers, content_type="application/json")

    return app


def _run(pool: EnvironmentPool, env: ExecutionEnvironment, payload: bytes, log) -> InvokeResult:
    cold = env.init_duration_ms is None
    try:
        result = env.invoke(payload)
    finally:
        pool.release(env)
    if len(result.payload) > MAX_SYNC_PAYLOAD_BYTES:
        result = InvokeResult(
            payload=_json(
                {
                    "errorType": "Function.ResponseSizeTooLarge",
                    "errorMessage": f"Response payload size exceeded maximum allowed payload size "
                    f"({MAX_SYNC_PAYLOAD_BYTES} bytes).",
                }
            ).encode(),
            function_error="Unhandled",
            request_id=result.request_id,
            duration_ms=result.duration_ms,
            init_duration_ms=result.init_duration_ms,
        )
    # The REPORT line CloudWatch shows for every invocation.
    init = f"\tInit Duration: {result.init_duration_ms:.2f} ms" if cold and result.init_duration_ms else ""
    status = f"\tStatus: error ({result.function_error})" if result.function_error else ""
    log(
        f"REPORT RequestId: {result.request_id}\tDuration: {result.duration_ms:.2f} ms"
        f"\tBilled Duration: {int(result.duration_ms) + 1} ms"
        f"\tMemory Size: {pool.spec.memory_mb} MB{init}{status}"
    )
    return result
