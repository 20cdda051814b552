"""One JSON line per request on the `serve.access` logger; never the user's text.

A reply is logged when Flask sends it. A stream's status is known only when it ends (a client that hangs
up is 499, a failure after the headers 500), so a stream logs itself when it closes: see routes._stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from flask import Flask, Response, g, request

from serve.generation import Finished

log = logging.getLogger("serve.access")


@dataclass
class Outcome:
    """What the access log reports about a request's generations."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str | None = None

    def record(self, results: Sequence[Finished]) -> None:
        self.prompt_tokens = sum(r.prompt_tokens for r in results)
        self.generated_tokens = sum(r.generated_tokens for r in results)
        self.finish_reason = results[-1].finish_reason if results else None


def write(method: str, path: str, status: int, started: float, outcome: Outcome, *, stream: bool = False) -> None:
    latency = time.monotonic() - started
    record = {
        "method": method,
        "path": path,
        "status": status,
        "latency_ms": round(latency * 1000, 1),
        "prompt_tokens": outcome.prompt_tokens,
        "generated_tokens": outcome.generated_tokens,
        "tokens_per_s": round(outcome.generated_tokens / latency, 1) if latency > 0 else None,
    }
    if outcome.finish_reason:
        record["finish_reason"] = outcome.finish_reason
    if stream:
        record["stream"] = True
    log.info(json.dumps(record))


def install(app: Flask) -> None:
    """Start each request's clock and Outcome (`g.started`, `g.outcome`); log every reply but streams."""

    @app.before_request
    def _start_clock() -> None:
        g.started = time.monotonic()
        g.outcome = Outcome()

    @app.after_request
    def _log_reply(response: Response) -> Response:
        # /ping is polled every few seconds; the loader logs its state changes instead.
        if request.path != "/ping" and not response.is_streamed:
            write(request.method, request.path, response.status_code, g.started, g.outcome)
        return response
