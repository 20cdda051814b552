"""One JSON line per request on the `serve.access` logger; never the user's text.

A reply is logged when Flask sends it. A stream's status is known only when it ends (a client that hangs
up is 499, a failure after the headers 500), so a stream logs itself when it closes: see routes._stream.
Every request's line also goes to the app's request observers (serve.metrics), streams included.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flask import Flask, Response, g, request

from serve.generation import Finished

log = logging.getLogger("serve.access")

# Polled routes: not logged, not counted (/ping's loader logs its state changes instead).
UNLOGGED_PATHS = ("/ping", "/metrics")
# app.extensions key: callables observe(status, latency_s, outcome, stream) run after each access line.
OBSERVERS = "serve.request_observers"


@dataclass
class Outcome:
    """What the access log reports about a request's generations."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str | None = None
    # Seconds from submitting to the first token chosen (the earliest of the request's generations), if any.
    time_to_first_token_s: float | None = None
    route: str = "other"  # the matched URL rule (bounded, unlike the path), for metrics labels
    observers: Sequence[Callable[..., None]] = field(default=(), repr=False)

    def record(self, results: Sequence[Finished]) -> None:
        self.prompt_tokens = sum(r.prompt_tokens for r in results)
        self.generated_tokens = sum(r.generated_tokens for r in results)
        self.finish_reason = results[-1].finish_reason if results else None
        waits = [
            r.first_token_at - r.submitted_at
            for r in results
            if r.first_token_at is not None and r.submitted_at is not None
        ]
        self.time_to_first_token_s = max(0.0, min(waits)) if waits else None


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
    if outcome.time_to_first_token_s is not None:
        record["ttft_ms"] = round(outcome.time_to_first_token_s * 1000, 1)
    if outcome.finish_reason:
        record["finish_reason"] = outcome.finish_reason
    if stream:
        record["stream"] = True
    log.info(json.dumps(record))
    for observe in outcome.observers:
        try:
            observe(status, latency, outcome, stream)
        except Exception:  # metrics must never fail a request (a stream's close runs this too)
            log.exception("request observer %r failed", observe)


def install(app: Flask) -> None:
    """Start each request's clock and Outcome (`g.started`, `g.outcome`); log every reply but streams."""
    observers = app.extensions.setdefault(OBSERVERS, [])

    @app.before_request
    def _start_clock() -> None:
        g.started = time.monotonic()
        rule = request.url_rule.rule if request.url_rule is not None else "other"
        g.outcome = Outcome(route=rule, observers=tuple(observers))

    @app.after_request
    def _log_reply(response: Response) -> Response:
        if request.path not in UNLOGGED_PATHS and not response.is_streamed:
            write(request.method, request.path, response.status_code, g.started, g.outcome)
        return response
