"""Serving metrics, fed by the access log's one record per finished request (serve.access_log.write, streams
included; /ping and /metrics are not counted):

- CloudWatch Embedded Metric Format (SERVE_METRICS=emf, the default): one JSON line per request on stdout, with
  the `_aws` directive that makes CloudWatch Logs turn its numbers into CloudWatch metrics. On SageMaker the
  container's stdout goes to the endpoint's log group, so the metrics appear without an agent or an API call.
- Prometheus: `GET /metrics`, for local use. gunicorn runs several worker processes; each writes its samples to
  files in $PROMETHEUS_MULTIPROC_DIR (made by gunicorn.conf.py before it forks them), and whichever worker
  answers /metrics reports the sum over all of them.

The EMF line has no endpoint name: SageMaker does not tell a container which endpoint or variant it serves. Name
them yourself in the model's environment (SERVE_METRICS_DIMENSIONS=EndpointName=...,VariantName=...) or give each
endpoint its own SERVE_METRICS_NAMESPACE.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app

if TYPE_CHECKING:
    from serve.access_log import Outcome
    from serve.config import ServeConfig
    from serve.predictor import Predictor

bp = Blueprint("metrics", __name__)
log = logging.getLogger("serve.metrics")

# (name, CloudWatch unit) of every metric an EMF line may carry; a line carries only those it has a value for.
EMF_METRICS = (
    ("Requests", "Count"),
    ("Latency", "Milliseconds"),
    ("TimeToFirstToken", "Milliseconds"),
    ("TokensPerSecond", "Count/Second"),
    ("PromptTokens", "Count"),
    ("GeneratedTokens", "Count"),
    ("QueueDepth", "Count"),
)
# Seconds: a token chosen within 10 ms (a warm GPU) up to the 60 s invocation limit and past it.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


def install(app: Flask, config: ServeConfig) -> None:
    """Add GET /metrics and observe every request the access log writes (serve.access_log.OBSERVERS)."""
    from serve.access_log import OBSERVERS

    _configure_emf_logger()
    dimensions = config.emf_dimensions
    predictor = app.extensions["serve.predictor"]
    prometheus = _prometheus()

    def observe(status: int, latency_s: float, outcome: Outcome, stream: bool) -> None:
        depth = queue_depth(predictor)
        prometheus.observe(status, latency_s, outcome, depth)
        if config.metrics == "emf":
            line = emf_record(
                status=status,
                latency_s=latency_s,
                outcome=outcome,
                stream=stream,
                queue_depth=depth,
                namespace=config.metrics_namespace,
                dimensions=dimensions,
            )
            log.info(json.dumps(line))

    app.extensions.setdefault(OBSERVERS, []).append(observe)
    app.register_blueprint(bp)


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    _prometheus().queue_depth.set(queue_depth(current_app.extensions["serve.predictor"]) or 0)
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def queue_depth(predictor: Predictor) -> int | None:
    """Requests queued or running in this worker's engine now (None before the model has loaded)."""
    engine = getattr(predictor, "engine", None)
    return engine.pending if engine is not None else None


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def emf_record(
    *,
    status: int,
    latency_s: float,
    outcome: Outcome,
    stream: bool,
    queue_depth: int | None,
    namespace: str,
    dimensions: Mapping[str, str],
    now: float | None = None,
) -> dict[str, Any]:
    """One request as an EMF document: metric values and dimension values at the root, and the `_aws`
    directive naming which root members are metrics (with units) and which are dimensions."""
    values: dict[str, float | int] = {
        "Requests": 1,
        "Latency": round(latency_s * 1000, 1),
        "PromptTokens": outcome.prompt_tokens,
        "GeneratedTokens": outcome.generated_tokens,
    }
    if outcome.time_to_first_token_s is not None:
        values["TimeToFirstToken"] = round(outcome.time_to_first_token_s * 1000, 1)
    if outcome.generated_tokens and latency_s > 0:
        values["TokensPerSecond"] = round(outcome.generated_tokens / latency_s, 2)
    if queue_depth is not None:
        values["QueueDepth"] = queue_depth
    keys = list(dimensions)
    record: dict[str, Any] = {
        "_aws": {
            "Timestamp": int((time.time() if now is None else now) * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": namespace,
                    # Per route, and per route and outcome (2xx, 4xx, 5xx): e.g. Latency of the 2xx only.
                    "Dimensions": [[*keys, "Route"], [*keys, "Route", "StatusClass"]],
                    "Metrics": [{"Name": name, "Unit": unit} for name, unit in EMF_METRICS if name in values],
                }
            ],
        },
        **dimensions,
        "Route": outcome.route,
        "StatusClass": status_class(status),
        **values,
        # Plain properties: searchable in CloudWatch Logs Insights, not metrics.
        "Status": status,
        "Stream": stream,
    }
    if outcome.finish_reason:
        record["FinishReason"] = outcome.finish_reason
    return record


class _Prometheus:
    """The Prometheus metrics, created once per process. In multiprocess mode each value lives in a file of
    this worker's pid; gauges sum over the live workers (`livesum`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("serve_requests", "Requests answered, by route and status", ["route", "status"])
        self.prompt_tokens = Counter("serve_prompt_tokens", "Prompt tokens read")
        self.generated_tokens = Counter("serve_generated_tokens", "Tokens generated")
        self.latency = Histogram(
            "serve_request_duration_seconds", "Request latency, to the last byte", ["route"], buckets=LATENCY_BUCKETS
        )
        self.time_to_first_token = Histogram(
            "serve_time_to_first_token_seconds", "From queueing a request to its first token", buckets=TTFT_BUCKETS
        )
        self.queue_depth = Gauge(
            "serve_queue_depth",
            "Requests queued or running (as of each worker's last finished request or scrape)",
            multiprocess_mode="livesum",
        )

    def observe(self, status: int, latency_s: float, outcome: Outcome, depth: int | None) -> None:
        self.requests.labels(route=outcome.route, status=str(status)).inc()
        self.latency.labels(route=outcome.route).observe(latency_s)
        self.prompt_tokens.inc(outcome.prompt_tokens)
        self.generated_tokens.inc(outcome.generated_tokens)
        if outcome.time_to_first_token_s is not None:
            self.time_to_first_token.observe(outcome.time_to_first_token_s)
        if depth is not None:
            self.queue_depth.set(depth)


@functools.cache
def _prometheus() -> _Prometheus:
    """prometheus_client registers each metric name once per process; apps (tests build many) share them."""
    return _Prometheus()


def _configure_emf_logger() -> None:
    """EMF lines are bare JSON on stdout, apart from the logs on stderr: each line is one CloudWatch log event."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
