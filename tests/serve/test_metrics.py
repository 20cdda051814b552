"""Serving metrics: one CloudWatch EMF line per finished request, and Prometheus GET /metrics (summed over
gunicorn's workers)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve import create_app
from serve.access_log import Outcome
from serve.config import ConfigError, ServeConfig
from serve.metrics import EMF_METRICS, emf_record

Q = "What solutions come pre-built with Amazon SageMaker JumpStart?"
# CloudWatch's units (MetricDatum.Unit); an EMF metric's Unit must be one of them.
_SIZES = ("Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits")
CLOUDWATCH_UNITS = {
    *("Seconds", "Microseconds", "Milliseconds", *_SIZES, "Terabits", "Percent", "Count", "None"),
    *(f"{unit}/Second" for unit in (*_SIZES, "Terabits", "Count")),
}


def validate_emf(document: dict) -> None:
    """The rules of CloudWatch's embedded metric format specification that a log event must follow for its
    metrics to be extracted."""
    aws = document["_aws"]
    assert isinstance(aws, dict) and set(aws) <= {"Timestamp", "CloudWatchMetrics", "LogGroupName"}
    assert isinstance(aws["Timestamp"], int) and abs(aws["Timestamp"] / 1000 - time.time()) < 3600  # ms since epoch
    directives = aws["CloudWatchMetrics"]
    assert isinstance(directives, list) and directives
    for directive in directives:
        assert set(directive) == {"Namespace", "Dimensions", "Metrics"}
        assert isinstance(directive["Namespace"], str) and 1 <= len(directive["Namespace"]) <= 255
        assert isinstance(directive["Dimensions"], list)
        for dimension_set in directive["Dimensions"]:
            assert isinstance(dimension_set, list) and len(dimension_set) <= 30
            for name in dimension_set:
                assert isinstance(document[name], str) and document[name], name  # a root member, a string
        metrics = directive["Metrics"]
        assert isinstance(metrics, list) and 1 <= len(metrics) <= 100
        for metric in metrics:
            assert set(metric) <= {"Name", "Unit", "StorageResolution"}
            assert metric.get("Unit", "None") in CLOUDWATCH_UNITS, metric
            value = document[metric["Name"]]  # a root member, a number
            assert isinstance(value, int | float) and not isinstance(value, bool), metric


@pytest.fixture
def emf_lines():
    """The EMF documents the `serve.metrics` logger writes during the test."""
    documents: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record):
            documents.append(json.loads(record.getMessage()))

    handler = Collect()
    logger = logging.getLogger("serve.metrics")
    logger.addHandler(handler)
    yield documents
    logger.removeHandler(handler)


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return parse_samples(response.get_data(as_text=True))


def parse_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ----- the EMF document itself -----


def test_an_emf_document_carries_the_request_and_validates():
    outcome = Outcome(prompt_tokens=31, generated_tokens=42, finish_reason="eos_token", route="/invocations")
    outcome.time_to_first_token_s = 0.125
    document = emf_record(
        status=200,
        latency_s=2.0,
        outcome=outcome,
        stream=True,
        queue_depth=3,
        namespace="LLMFineTune/Serving",
        dimensions={"EndpointName": "chat", "VariantName": "AllTraffic"},
        now=1_700_000_000.5,
    )
    validate_emf({**document, "_aws": {**document["_aws"], "Timestamp": int(time.time() * 1000)}})
    assert document["_aws"]["Timestamp"] == 1_700_000_000_500
    directive = document["_aws"]["CloudWatchMetrics"][0]
    assert directive["Dimensions"] == [
        ["EndpointName", "VariantName", "Route"],
        ["EndpointName", "VariantName", "Route", "StatusClass"],
    ]
    assert {m["Name"] for m in directive["Metrics"]} == {name for name, _ in EMF_METRICS}
    assert (document["TimeToFirstToken"], document["TokensPerSecond"], document["QueueDepth"]) == (125.0, 21.0, 3)
    assert (document["PromptTokens"], document["GeneratedTokens"], document["Latency"]) == (31, 42, 2000.0)
    assert (document["StatusClass"], document["Status"], document["FinishReason"]) == ("2xx", 200, "eos_token")
    assert (document["EndpointName"], document["VariantName"], document["Stream"]) == ("chat", "AllTraffic", True)


def test_metrics_without_a_value_are_left_out_not_null():
    document = emf_record(
        status=422,
        latency_s=0.01,
        outcome=Outcome(route="/invocations"),
        stream=False,
        queue_depth=None,
        namespace="N",
        dimensions={},
    )
    validate_emf(document)
    names = {m["Name"] for m in document["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert names == {"Requests", "Latency", "PromptTokens", "GeneratedTokens"}
    assert "TimeToFirstToken" not in document and "QueueDepth" not in document
    assert document["StatusClass"] == "4xx"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVE_METRICS": "cloudwatch"}, "SERVE_METRICS must be emf or off"),
        ({"SERVE_METRICS_NAMESPACE": "x" * 256}, "SERVE_METRICS_NAMESPACE"),
        ({"SERVE_METRICS_DIMENSIONS": "EndpointName"}, "is not Name=value"),
        ({"SERVE_METRICS_DIMENSIONS": "Route=x"}, "a name the metrics lines use"),
    ],
)
def test_bad_metrics_settings_fail_at_start(env, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_env(env)


def test_metrics_dimensions_parse_in_order():
    config = ServeConfig.from_env({"SERVE_METRICS_DIMENSIONS": "EndpointName=chat, VariantName=AllTraffic"})
    assert list(config.emf_dimensions.items()) == [("EndpointName", "chat"), ("VariantName", "AllTraffic")]


# ----- in-process, with the real tiny model -----


def test_each_request_writes_one_valid_emf_line(client, emf_lines):
    response = client.post("/invocations", json={"inputs": Q, "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 200
    (document,) = emf_lines
    validate_emf(document)
    assert document["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "LLMFineTune/Serving"
    assert (document["Route"], document["StatusClass"], document["Stream"]) == ("/invocations", "2xx", False)
    assert document["PromptTokens"] > 0 and 1 <= document["GeneratedTokens"] <= 5
    assert 0 < document["TimeToFirstToken"] <= document["Latency"]
    assert document["QueueDepth"] == 0  # nothing else is running
    assert document["FinishReason"] in ("eos_token", "length", "stop_sequence")


def test_a_stream_writes_its_line_when_it_ends_with_its_time_to_first_token(client, emf_lines):
    response = client.post("/invocations", json={"inputs": Q, "stream": True, "parameters": {"max_new_tokens": 4}})
    assert emf_lines == []  # not yet: the stream has not been read
    b"".join(response.response)
    response.close()
    (document,) = emf_lines
    validate_emf(document)
    assert document["Stream"] is True and document["StatusClass"] == "2xx"
    assert 0 < document["TimeToFirstToken"] <= document["Latency"]


def test_errors_are_counted_with_their_status_class(client, emf_lines):
    response = client.post("/invocations", json={"inputs": Q, "parameters": {"temperature": -1}})
    assert response.status_code == 422
    (document,) = emf_lines
    validate_emf(document)
    assert (document["StatusClass"], document["Status"], document["GeneratedTokens"]) == ("4xx", 422, 0)
    assert "TimeToFirstToken" not in document


def test_prometheus_counters_move_after_requests(client, emf_lines, access_lines):
    before = scrape(client)
    generate = {"inputs": Q, "parameters": {"max_new_tokens": 3}}
    assert client.post("/invocations", json=generate).status_code == 200
    assert client.post("/invocations", json={"inputs": Q, "parameters": {"top_p": 0}}).status_code == 422
    assert client.get("/ping").status_code == 200
    after = scrape(client)

    ok = ("serve_requests_total", {"route": "/invocations", "status": "200"})
    bad = ("serve_requests_total", {"route": "/invocations", "status": "422"})
    assert sample(after, ok[0], **ok[1]) - sample(before, ok[0], **ok[1]) == 1
    assert sample(after, bad[0], **bad[1]) - sample(before, bad[0], **bad[1]) == 1
    generated = emf_lines[0]["GeneratedTokens"]
    assert sample(after, "serve_generated_tokens_total") - sample(before, "serve_generated_tokens_total") == generated
    ttft = "serve_time_to_first_token_seconds_count"
    assert sample(after, ttft) - sample(before, ttft) == 1  # the 422 never reached the model
    latency = "serve_request_duration_seconds_count"
    assert sample(after, latency, route="/invocations") - sample(before, latency, route="/invocations") == 2
    assert sample(after, "serve_queue_depth") == 0
    # /ping and /metrics are neither logged nor counted.
    assert not any(k[0] == "serve_requests_total" and ("route", "/ping") in k[1] for k in after)
    assert not any(k[0] == "serve_requests_total" and ("route", "/metrics") in k[1] for k in after)
    assert [json.loads(line)["path"] for line in access_lines] == ["/invocations", "/invocations"]


def test_unknown_paths_share_one_label(client):
    before = scrape(client)
    assert client.get("/no/such/path/12345").status_code == 404
    after = scrape(client)
    key = ("serve_requests_total", {"route": "other", "status": "404"})
    assert sample(after, key[0], **key[1]) - sample(before, key[0], **key[1]) == 1


def test_emf_off_writes_no_line(predictor, emf_lines):
    app = create_app(dataclasses.replace(predictor.config, metrics="off"), predictor=predictor)
    client = app.test_client()
    assert client.post("/invocations", json={"inputs": Q, "parameters": {"max_new_tokens": 2}}).status_code == 200
    assert emf_lines == []


# ----- the real server: two gunicorn workers, one /metrics -----


def _requests_per_worker(directory: Path) -> dict[str, float]:
    """serve_requests_total per worker pid, read from each worker's multiprocess file."""
    from prometheus_client.mmap_dict import MmapedDict

    counts = {}
    for path in directory.glob("counter_*.db"):
        total = 0.0
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            name = json.loads(key)[0]
            if name == "serve_requests":
                total += value
        counts[path.stem.removeprefix("counter_")] = total
    return counts


@pytest.mark.slow
def test_metrics_on_any_worker_report_the_whole_server(tiny_model_dir, tmp_path, serve_process):
    metrics_dir = tmp_path / "prometheus"
    server = serve_process(
        tiny_model_dir,
        tmp_path,
        SAGEMAKER_MODEL_SERVER_WORKERS="2",
        SERVE_MAX_BATCH_SIZE="4",
        SERVE_MAX_QUEUE="8",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        SERVE_METRICS_DIMENSIONS="EndpointName=local-test",
        MESSAGES_API_ENABLED="true",  # a TGI name (test_config_aliases): logged once, by the master
    )
    try:
        server.wait_ready()
        sent = 0
        body = {"inputs": Q, "parameters": {"max_new_tokens": 2}}
        with ThreadPoolExecutor(8) as pool:
            for _ in range(6):  # until both workers have answered some (the kernel picks who accepts)
                statuses = list(pool.map(lambda _: server.request("POST", "/invocations", body)[0], range(8)))
                assert statuses == [200] * 8
                sent += 8
                if sum(1 for count in _requests_per_worker(metrics_dir).values() if count > 0) >= 2:
                    break
        per_worker = _requests_per_worker(metrics_dir)
        assert sum(1 for count in per_worker.values() if count > 0) == 2, per_worker

        for _ in range(6):  # each scrape, whichever worker answers it, reports both workers' requests
            status, headers, text = server.request("GET", "/metrics")
            assert status == 200 and headers["Content-Type"].startswith("text/plain")
            samples = parse_samples(text.decode())
            assert sample(samples, "serve_requests_total", route="/invocations", status="200") == sent
            assert sample(samples, "serve_request_duration_seconds_count", route="/invocations") == sent
            assert sample(samples, "serve_time_to_first_token_seconds_count") == sent
            assert sample(samples, "serve_generated_tokens_total") >= sent
            assert sample(samples, "serve_queue_depth") == 0

        # The EMF lines went to stdout, one per request, each a valid document.
        documents = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"_aws"')]
        assert len(documents) == sent
        for document in documents:
            validate_emf(document)
            assert document["EndpointName"] == "local-test"
        assert '"path": "/metrics"' not in server.output()
        assert server.output().count("MESSAGES_API_ENABLED=true: accepted and ignored") == 1
    finally:
        server.stop()
    assert not list(metrics_dir.glob("gauge_livesum_*.db"))  # child_exit dropped each exited worker's gauge
