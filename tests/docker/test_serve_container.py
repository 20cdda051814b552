"""`docker run IMAGE serve` on the training image's artifact: /ping, /invocations, streaming, SIGTERM.

Tests in this module share one container and run in file order; the `docker stop` test comes last.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = pytest.mark.docker

QUESTION = "What is Amazon SageMaker?"


def test_ping_answers_200_once_the_model_is_loaded(serving):
    with urllib.request.urlopen(f"http://127.0.0.1:{serving.port}/ping", timeout=2) as r:
        assert r.status == 200


def test_invocations_generates_text(serving):
    status, headers, body = serving.post("/invocations", {"inputs": QUESTION, "parameters": {"max_new_tokens": 8}})
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    assert "generated_text" in json.dumps(json.loads(body)), body


def test_invocations_streams_server_sent_events(serving):
    status, headers, chunks = serving.stream({"inputs": QUESTION, "parameters": {"max_new_tokens": 8}, "stream": True})
    body = b"".join(chunks)
    assert status == 200, body
    assert headers["content-type"].startswith("text/event-stream"), headers
    events = [line for line in body.decode().splitlines() if line.startswith("data:")]
    assert events, body


def test_invocations_rejects_a_malformed_request_with_a_json_error(serving):
    status, headers, body = serving.post("/invocations", {"no_such_field": 1})
    assert 400 <= status < 500, (status, body)
    assert headers["content-type"].startswith("application/json")
    json.loads(body)


def test_serves_as_the_unprivileged_user_and_stops_cleanly(start_serving, artifact_dir):
    # Outside SageMaker (compose, Kubernetes) the image can run without root: nothing is written on disk,
    # but every artifact file must be readable by others (SageMaker's model.tar.gz keeps the modes).
    unreadable = sorted(p.name for p in artifact_dir.rglob("*") if p.is_file() and not p.stat().st_mode & 0o004)
    assert not unreadable, f"artifact files not world-readable, a non-root server cannot load them: {unreadable}"
    container = start_serving(artifact_dir, "--user", "model-server", name="llmft-test-serve-nonroot")
    status, _, body = container.post("/invocations", {"inputs": QUESTION, "parameters": {"max_new_tokens": 4}})
    assert status == 200, body
    seconds = container.stop()
    state = container.state()
    assert (state["ExitCode"], state["OOMKilled"]) == (0, False), container.logs()
    assert seconds < 30, container.logs()


def test_docker_stop_exits_cleanly_within_30_s(serving, docker_cli):
    # SageMaker sends SIGTERM and SIGKILLs 30 s later; a clean exit is code 0 well before that.
    seconds = serving.stop(grace_s=30)
    state = serving.state()
    assert (state["ExitCode"], state["OOMKilled"]) == (0, False), serving.logs()
    assert seconds < 30, f"took {seconds:.1f} s:\n{serving.logs()}"
    docker_cli.record_timing("docker stop (serve, root)", seconds)
