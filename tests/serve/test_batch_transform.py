"""Batch transform with the settings /execution-parameters advertises: a JSON Lines body of any length is fed
through the queue a few records at a time, and the advertised number of bodies at once fits the queue."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve import adapters, create_app
from serve.config import ServeConfig
from serve.schemas import MAX_CHAT_MESSAGES, MAX_STOP_SEQUENCE_CHARS

JSONLINES = "application/jsonlines"


def _body(records: int, tag: str = "") -> bytes:
    lines = [{"inputs": f"question {tag}{i}", "parameters": {"max_new_tokens": 1}} for i in range(records)]
    return "\n".join(json.dumps(line) for line in lines).encode()


@pytest.fixture(scope="module")
def app(predictor):
    return create_app(predictor.config, predictor=predictor)


@pytest.mark.parametrize(
    "settings",
    [{}, {"max_queue": 40, "max_batch_size": 8}, {"max_payload_mb": 20}, {"max_queue": 4, "max_batch_size": 4}],
)
def test_what_is_advertised_fits_the_queue(settings, tmp_path):
    config = ServeConfig(model_dir=tmp_path, **settings)
    advertised = adapters.execution_parameters(config)
    assert advertised["MaxConcurrentTransforms"] * advertised["MaxPayloadInMB"] <= 100  # the platform's rule
    assert advertised["MaxConcurrentTransforms"] * adapters.records_in_flight(config) <= config.max_queue


def test_a_thousand_records_in_one_body_are_all_answered(app):
    response = app.test_client().post("/invocations", data=_body(1000), content_type=JSONLINES)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    lines = response.get_data(as_text=True).splitlines()
    assert len(lines) == 1000
    assert all("generated_text" in json.loads(line)[0] for line in lines)


def test_as_many_bodies_at_once_as_advertised_are_all_answered(app, predictor):
    bodies = adapters.execution_parameters(predictor.config)["MaxConcurrentTransforms"]
    assert bodies == 16

    def transform(index: int) -> tuple[int, int]:
        response = app.test_client().post("/invocations", data=_body(40, f"{index}-"), content_type=JSONLINES)
        return response.status_code, len(response.get_data(as_text=True).splitlines())

    with ThreadPoolExecutor(max_workers=bodies) as pool:
        outcomes = list(pool.map(transform, range(bodies)))
    assert outcomes == [(200, 40)] * bodies


def test_records_over_the_cap_are_refused_naming_the_cap(app):
    response = app.test_client().post(
        "/invocations", data=_body(adapters.MAX_JSONLINES_RECORDS + 1), content_type=JSONLINES
    )
    assert response.status_code == 422
    assert f"at most {adapters.MAX_JSONLINES_RECORDS}" in response.get_json()["error"]


def test_stop_strings_and_messages_are_capped_before_any_work(app):
    client = app.test_client()
    long_stop = "x" * (MAX_STOP_SEQUENCE_CHARS + 1)
    response = client.post("/invocations", json={"inputs": "hi", "parameters": {"stop": [long_stop]}})
    assert response.status_code == 422 and "stop" in response.get_json()["error"]
    messages = [{"role": "user", "content": "hi"}] * (MAX_CHAT_MESSAGES + 1)
    response = client.post("/invocations", json={"messages": messages})
    assert response.status_code == 422 and "messages" in response.get_json()["error"]
