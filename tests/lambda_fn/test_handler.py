"""The Lambda handler with REST (v1) and HTTP API (v2) events, each bad input, and every SageMaker error
mapping, against the handler's own real boto3 client stubbed by botocore's Stubber (no network)."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from botocore.response import StreamingBody
from lambda_fn.events_helpers import ANSWER, PAGE_ORIGIN, QUESTION, ask_event, load_event, model_output

REPO = Path(__file__).resolve().parents[2]


def stub_answer(stubber, text=ANSWER, variant="AllTraffic", expected_body=None, target_variant=None, sources=None):
    body = model_output(text, sources=sources)
    expected = {
        "EndpointName": "qa-endpoint",
        "Body": expected_body if expected_body is not None else _any(),
        "ContentType": "application/json",
        "Accept": "application/json",
    }
    if target_variant:
        expected["TargetVariant"] = target_variant
    stubber.add_response(
        "invoke_endpoint",
        {
            "Body": StreamingBody(io.BytesIO(body), len(body)),
            "ContentType": "application/json",
            "InvokedProductionVariant": variant,
        },
        expected,
    )


def _any():
    from botocore.stub import ANY

    return ANY


def body_of(response):
    return json.loads(response["body"])


# --- happy paths --------------------------------------------------------------------------------------


def test_rest_v1_event_answers_with_variant_latency_and_cors(stubbed, context):
    handler, stubber = stubbed
    expected_body = json.dumps({"inputs": QUESTION, "parameters": {"max_new_tokens": 64, "details": True}}).encode()
    stub_answer(stubber, variant="tuned", expected_body=expected_body)

    response = handler.handler(load_event("rest_v1_ask.json"), context)

    assert response["statusCode"] == 200, response
    body = body_of(response)
    assert body["answer"] == ANSWER
    assert body["variant"] == "tuned"
    assert isinstance(body["latency_ms"], int | float) and body["latency_ms"] >= 0
    assert response["headers"]["Access-Control-Allow-Origin"] == PAGE_ORIGIN
    assert response["headers"]["Vary"] == "Origin"
    assert response["headers"]["Content-Type"] == "application/json"


def test_http_v2_event_with_base64_body(stubbed, context):
    handler, stubber = stubbed
    expected_body = json.dumps({"inputs": QUESTION, "parameters": {"max_new_tokens": 192, "details": True}}).encode()
    stub_answer(stubber, expected_body=expected_body)

    response = handler.handler(load_event("http_v2_ask.json"), context)

    assert response["statusCode"] == 200, response
    assert body_of(response) == {
        "answer": ANSWER,
        "variant": "AllTraffic",
        "latency_ms": pytest.approx(body_of(response)["latency_ms"]),
    }


def test_stage_prefix_in_path_is_accepted(stubbed, context):
    handler, stubber = stubbed
    stub_answer(stubber)
    event = ask_event({"question": QUESTION}, version="2.0", path="/prod/ask")
    assert handler.handler(event, context)["statusCode"] == 200


def test_target_variant_is_passed_to_invoke_endpoint(stubbed, context):
    handler, stubber = stubbed
    stub_answer(stubber, variant="base", target_variant="base")
    response = handler.handler(ask_event({"question": QUESTION, "target_variant": "base"}), context)
    assert response["statusCode"] == 200
    assert body_of(response)["variant"] == "base"


def test_single_object_model_output_is_accepted(stubbed, context):
    handler, stubber = stubbed
    body = json.dumps({"generated_text": "  forty-two \n"}).encode()
    stubber.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body))})
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert body_of(response)["answer"] == "forty-two"
    assert body_of(response)["variant"] is None


# --- sources (the model's retrieval index) ---------------------------------------------------------------

SOURCES = [
    {"id": 4, "title": "What is Amazon SageMaker?", "source": "faq.csv#5", "score": 1.93},
    {"id": 17, "title": "guide.md: Endpoints > Scaling", "source": "docs/guide.md#p3", "score": 0.41},
]


def test_sources_are_passed_through_without_id_and_score(stubbed, context):
    handler, stubber = stubbed
    stub_answer(stubber, sources=SOURCES)
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 200, response
    assert body_of(response)["sources"] == [
        {"title": "What is Amazon SageMaker?", "source": "faq.csv#5"},
        {"title": "guide.md: Endpoints > Scaling", "source": "docs/guide.md#p3"},
    ]


def test_no_sources_key_when_the_model_gives_none(stubbed, context):
    handler, stubber = stubbed
    stub_answer(stubber)  # a model without a retrieval index: no `sources` in its reply
    body = body_of(handler.handler(ask_event({"question": QUESTION}), context))
    assert body["answer"] == ANSWER
    assert "sources" not in body


def test_an_empty_source_list_stays_empty(stubbed, context):
    """Retrieval ran and found nothing: said as [], not confused with a model that has no index."""
    handler, stubber = stubbed
    stub_answer(stubber, sources=[])
    assert body_of(handler.handler(ask_event({"question": QUESTION}), context))["sources"] == []


def test_retrieval_false_is_forwarded_to_the_endpoint(stubbed, context, capsys):
    handler, stubber = stubbed
    expected_body = json.dumps(
        {"inputs": QUESTION, "parameters": {"max_new_tokens": 192, "details": True, "retrieval": False}}
    ).encode()
    stub_answer(stubber, expected_body=expected_body)
    response = handler.handler(ask_event({"question": QUESTION, "retrieval": False}), context)
    assert response["statusCode"] == 200, response
    assert "sources" not in body_of(response)
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event": "request"' in line]
    assert logged[-1]["retrieval"] is False and logged[-1]["sources"] is None


def test_retrieval_true_sends_nothing_new(stubbed, context):
    """On is the server's default; an older server without retrieval refuses parameters it does not know."""
    handler, stubber = stubbed
    expected_body = json.dumps({"inputs": QUESTION, "parameters": {"max_new_tokens": 192, "details": True}}).encode()
    stub_answer(stubber, expected_body=expected_body, sources=SOURCES)
    response = handler.handler(ask_event({"question": QUESTION, "retrieval": True}), context)
    assert len(body_of(response)["sources"]) == 2


def test_retrieval_in_parameters_is_refused_with_a_hint(stubbed, context):
    handler, _ = stubbed
    response = handler.handler(ask_event({"question": QUESTION, "parameters": {"retrieval": False}}), context)
    assert response["statusCode"] == 400
    assert '"retrieval" goes at the top level' in body_of(response)["error"]


MALFORMED_SOURCES = [
    "faq.csv#1",  # not an object
    None,
    ["What?", "faq.csv#1"],
    {"title": "No source"},
    {"source": "faq.csv#2"},
    {"title": 42, "source": "faq.csv#3"},
    {"title": "Source not a string", "source": {"file": "faq.csv"}},
    {"title": "", "source": "faq.csv#4"},
    {"title": " \n\t ", "source": "faq.csv#5"},  # nothing printable left
    {"title": "\u202e\u200b", "source": "faq.csv#6"},  # only format characters
]


def test_malformed_sources_are_dropped_and_the_answer_kept(stubbed, context, capsys):
    handler, stubber = stubbed
    good = {"id": 1, "title": "Kept", "source": "faq.csv#7", "score": "not a number: ignored"}
    stub_answer(stubber, sources=[*MALFORMED_SOURCES[:5], good, *MALFORMED_SOURCES[5:]])
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 200, response
    body = body_of(response)
    assert body["answer"] == ANSWER
    assert body["sources"] == [{"title": "Kept", "source": "faq.csv#7"}]
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event": "request"' in line]
    assert logged[-1]["sources"] == 1
    assert logged[-1]["sources_dropped"] == len(MALFORMED_SOURCES)


@pytest.mark.parametrize("raw", ["faq.csv#1", {"title": "t", "source": "s"}, 3, None])
def test_sources_that_are_not_a_list_are_ignored(stubbed, context, raw):
    handler, stubber = stubbed
    body = json.dumps([{"generated_text": ANSWER, "sources": raw}]).encode()
    stubber.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body))})
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 200
    assert "sources" not in body_of(response)


def test_sources_are_capped_in_number_and_length(stubbed, context):
    from qa_function.logic import MAX_SOURCE_REF_CHARS, MAX_SOURCE_TITLE_CHARS, MAX_SOURCES

    handler, stubber = stubbed
    huge = "A" * 2_000_000
    many = [{"id": i, "title": f"Question {i}", "source": f"faq.csv#{i}", "score": 1.0} for i in range(50)]
    stub_answer(stubber, sources=[{"id": 0, "title": huge, "source": "x" * 5000, "score": 1.0}, *many])
    response = handler.handler(ask_event({"question": QUESTION}), context)
    sources = body_of(response)["sources"]
    assert len(sources) == MAX_SOURCES
    assert len(sources[0]["title"]) == MAX_SOURCE_TITLE_CHARS and sources[0]["title"].endswith("…")
    assert len(sources[0]["source"]) == MAX_SOURCE_REF_CHARS
    assert sources[1] == {"title": "Question 0", "source": "faq.csv#0"}
    assert len(response["body"]) < 10_000  # the 2 MB title is not echoed


def test_source_text_is_one_clean_line_and_markup_is_left_as_text():
    """The page renders sources with textContent; the function keeps markup as text, one line, printable."""
    from qa_function.logic import Source, parse_sources

    raw = [
        {"title": "  Line one\n\n  line\ttwo \u202egnp.exe", "source": "faq.csv#1"},
        {"title": "<img src=x onerror=alert(1)>", "source": "javascript:alert(1)"},
        {"title": "lone \ud800 surrogate", "source": "faq.csv#2"},
    ]
    sources, dropped = parse_sources(raw)
    assert dropped == 0
    assert sources == (
        Source("Line one line two gnp.exe", "faq.csv#1"),
        Source("<img src=x onerror=alert(1)>", "javascript:alert(1)"),
        Source("lone surrogate", "faq.csv#2"),
    )


# --- CORS -----------------------------------------------------------------------------------------------


def test_preflight_from_allowed_origin(stubbed, context):
    handler, _ = stubbed
    response = handler.handler(load_event("rest_v1_preflight.json"), context)
    assert response["statusCode"] == 204
    headers = response["headers"]
    assert headers["Access-Control-Allow-Origin"] == PAGE_ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "x-api-key" in headers["Access-Control-Allow-Headers"]
    assert "content-type" in headers["Access-Control-Allow-Headers"]
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in headers


def test_preflight_from_other_origin_is_refused(stubbed, context):
    handler, _ = stubbed
    event = load_event("rest_v1_preflight.json")
    event["headers"]["Origin"] = "https://evil.example"
    event["multiValueHeaders"]["Origin"] = ["https://evil.example"]
    response = handler.handler(event, context)
    assert response["statusCode"] == 403
    assert "Access-Control-Allow-Origin" not in response["headers"]
    assert body_of(response)["error_type"] == "CorsOriginNotAllowed"


def test_post_from_other_origin_gets_no_cors_headers(stubbed, context):
    handler, stubber = stubbed
    stub_answer(stubber)
    response = handler.handler(ask_event({"question": QUESTION}, origin="https://evil.example"), context)
    assert response["statusCode"] == 200
    assert not any(h.lower().startswith("access-control-") for h in response["headers"])


def test_credentials_mode_echoes_origin_and_allows_credentials(lambda_env, fresh_handler, context):
    lambda_env.setenv("CORS_ALLOW_CREDENTIALS", "true")
    response = fresh_handler.handler(load_event("rest_v1_preflight.json"), context)
    assert response["headers"]["Access-Control-Allow-Origin"] == PAGE_ORIGIN
    assert response["headers"]["Access-Control-Allow-Credentials"] == "true"


def test_wildcard_with_credentials_fails_the_cold_start(lambda_env, fresh_handler, context):
    from qa_function.config import ConfigError

    lambda_env.setenv("CORS_ALLOW_ORIGINS", "*")
    lambda_env.setenv("CORS_ALLOW_CREDENTIALS", "true")
    with pytest.raises(ConfigError, match="cannot be combined"):
        fresh_handler.handler(load_event("rest_v1_preflight.json"), context)


def test_wildcard_without_credentials(lambda_env, fresh_handler, context):
    lambda_env.setenv("CORS_ALLOW_ORIGINS", "*")
    response = fresh_handler.handler(load_event("rest_v1_preflight.json"), context)
    assert response["headers"]["Access-Control-Allow-Origin"] == "*"


def test_missing_endpoint_name_fails_the_cold_start(lambda_env, fresh_handler, context):
    from qa_function.config import ConfigError

    lambda_env.delenv("ENDPOINT_NAME")
    with pytest.raises(ConfigError, match="ENDPOINT_NAME is required"):
        fresh_handler.handler(load_event("rest_v1_ask.json"), context)


@pytest.mark.parametrize("value", ["0", "5000", "many"])
def test_bad_default_answer_length_fails_the_cold_start(lambda_env, fresh_handler, context, value):
    from qa_function.config import ConfigError

    lambda_env.setenv("DEFAULT_MAX_NEW_TOKENS", value)
    with pytest.raises(ConfigError, match="DEFAULT_MAX_NEW_TOKENS"):
        fresh_handler.handler(load_event("rest_v1_ask.json"), context)


# --- bad input ------------------------------------------------------------------------------------------

BAD_INPUTS = [
    ("not json", b"{question: hi}", 400, "InvalidJSON"),
    ("empty body", b"", 400, "BadRequest"),
    ("not an object", b'["What?"]', 400, "BadRequest"),
    ("missing question", b'{"parameters": {}}', 400, "BadRequest"),
    ("empty question", b'{"question": "   "}', 400, "BadRequest"),
    ("question not a string", b'{"question": 42}', 400, "BadRequest"),
    ("question too long", json.dumps({"question": "x" * 4001}).encode(), 413, "QuestionTooLong"),
    ("body too large", json.dumps({"question": "x" * 70_000}).encode(), 413, "PayloadTooLarge"),
    ("unknown field", b'{"question": "q", "prompt": "p"}', 400, "BadRequest"),
    ("unknown parameter", b'{"question": "q", "parameters": {"max_tokens": 5}}', 400, "BadRequest"),
    ("bad parameter value", b'{"question": "q", "parameters": {"temperature": 9}}', 400, "BadRequest"),
    ("parameters not an object", b'{"question": "q", "parameters": [1]}', 400, "BadRequest"),
    ("bad variant name", b'{"question": "q", "target_variant": "no spaces"}', 400, "BadRequest"),
    ("retrieval not a boolean", b'{"question": "q", "retrieval": "no"}', 400, "BadRequest"),
    ("retrieval null", b'{"question": "q", "retrieval": null}', 400, "BadRequest"),
    ("retrieval as a parameter", b'{"question": "q", "parameters": {"retrieval": false}}', 400, "BadRequest"),
    ("not utf-8", b'{"question": "\xff\xfe"}', 400, "InvalidJSON"),
]


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize(("case", "raw", "status", "error_type"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_before_the_endpoint(stubbed, context, version, case, raw, status, error_type):
    handler, _ = stubbed  # no response queued: any call to the endpoint would fail the test
    event = ask_event(raw, version=version, base64_body=True)
    response = handler.handler(event, context)
    assert response["statusCode"] == status, (case, response)
    body = body_of(response)
    assert body["error_type"] == error_type
    assert body["error"]
    assert body["request_id"] == context.aws_request_id
    assert response["headers"]["Access-Control-Allow-Origin"] == PAGE_ORIGIN  # the page can read errors


def test_invalid_base64_body(stubbed, context):
    handler, _ = stubbed
    event = ask_event(b"", version="2.0")
    event.update(body="%%%not-base64%%%", isBase64Encoded=True)
    response = handler.handler(event, context)
    assert response["statusCode"] == 400
    assert "base64" in body_of(response)["error"]


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/ask", 405), ("POST", "/nope", 404), ("DELETE", "/", 404)]
)
def test_unknown_routes(stubbed, context, method, path, status):
    handler, _ = stubbed
    event = ask_event({"question": QUESTION}, version="1.0", path=path, method=method)
    response = handler.handler(event, context)
    assert response["statusCode"] == status
    if status == 405:
        assert response["headers"]["Allow"] == "OPTIONS, POST"


def test_not_an_api_gateway_event(stubbed, context):
    handler, _ = stubbed
    response = handler.handler({"hello": "world"}, context)
    assert response["statusCode"] == 400


def test_target_variant_can_be_disabled(lambda_env, fresh_handler, context):
    lambda_env.setenv("ALLOW_TARGET_VARIANT", "false")
    response = fresh_handler.handler(ask_event({"question": "q", "target_variant": "base"}), context)
    assert response["statusCode"] == 400
    assert "disabled" in body_of(response)["error"]


# --- SageMaker errors -----------------------------------------------------------------------------------


@pytest.fixture
def one_attempt(lambda_env):
    """Most mapping tests want exactly one call; retries are tested on their own."""
    lambda_env.setenv("SAGEMAKER_MAX_ATTEMPTS", "1")


ERRORS = [
    ("ModelError", 424, 'Received server error (500) from primary with message "boom"', 502, "ModelError"),
    (
        "ModelError",
        424,
        'Received server error (0) from primary with message "Your invocation timed out while waiting '
        'for a response from container primary."',
        504,
        "EndpointTimeout",
    ),
    ("ThrottlingException", 400, "Rate exceeded", 429, "EndpointThrottled"),
    ("ModelNotReadyException", 429, "Model is loading", 429, "EndpointThrottled"),
    (
        "ValidationError",
        400,
        "Endpoint qa-endpoint of account 123456789012 not found.",
        502,
        "EndpointUnavailable",
    ),
    ("ServiceUnavailable", 503, "Service Unavailable", 503, "EndpointUnavailable"),
    ("InternalFailure", 500, "Internal failure", 502, "EndpointUnavailable"),
]


@pytest.mark.parametrize(
    ("code", "http_status", "message", "status", "error_type"),
    ERRORS,
    ids=[f"{e[0]}->{e[3]}" for e in ERRORS],
)
def test_endpoint_errors_are_mapped(one_attempt, stubbed, context, code, http_status, message, status, error_type):
    handler, stubber = stubbed
    stubber.add_client_error(
        "invoke_endpoint", service_error_code=code, service_message=message, http_status_code=http_status
    )
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == status, response
    body = body_of(response)
    assert body["error_type"] == error_type
    assert response["headers"]["Access-Control-Allow-Origin"] == PAGE_ORIGIN


def test_model_error_names_the_container_status(one_attempt, stubbed, context):
    handler, stubber = stubbed
    stubber.add_client_error(
        "invoke_endpoint",
        service_error_code="ModelError",
        service_message="Received client error (400) from primary",
        http_status_code=424,
        modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": "bad input"},
    )
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 502
    assert "400" in body_of(response)["error"]


def test_unknown_variant_is_the_callers_error(one_attempt, stubbed, context):
    handler, stubber = stubbed
    stubber.add_client_error(
        "invoke_endpoint",
        service_error_code="ValidationError",
        service_message="The variant(s) [nope] is not valid for endpoint qa-endpoint.",
        http_status_code=400,
    )
    response = handler.handler(ask_event({"question": QUESTION, "target_variant": "nope"}), context)
    assert response["statusCode"] == 400
    assert body_of(response)["error_type"] == "UnknownVariant"


class _RawBody(io.BytesIO):
    """Enough of urllib3's response for botocore: read() for streaming bodies, stream() for errors."""

    def stream(self, **kwargs):
        yield self.read()


def _wire_responses(client, responses):
    """Answer InvokeEndpoint at the HTTP layer (before-send), so botocore's real retry logic and error
    parsing run. Stubber short-circuits before retries, so it cannot show them. Returns the call log."""
    from botocore.awsrequest import AWSResponse

    calls = []
    queue = list(responses)

    def send(request, **kwargs):
        calls.append(request.url)
        status, headers, body = queue.pop(0)
        headers = {"Content-Length": str(len(body)), **headers}
        return AWSResponse(request.url, status, headers, _RawBody(body))

    client.meta.events.register("before-send.sagemaker-runtime.InvokeEndpoint", send)
    return calls


THROTTLED = (400, {"x-amzn-ErrorType": "ThrottlingException"}, b'{"message": "Rate exceeded"}')


def test_throttling_is_retried_then_mapped_to_429(fresh_handler, context):
    runtime = fresh_handler.get_runtime(context)  # default SAGEMAKER_MAX_ATTEMPTS=2
    calls = _wire_responses(runtime.client, [THROTTLED, THROTTLED])
    response = fresh_handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 429
    assert len(calls) == 2
    assert calls[0].endswith("/endpoints/qa-endpoint/invocations")


def test_throttling_then_success_is_retried(fresh_handler, context):
    runtime = fresh_handler.get_runtime(context)
    ok = (
        200,
        {"x-Amzn-Invoked-Production-Variant": "AllTraffic", "Content-Type": "application/json"},
        model_output(),
    )
    calls = _wire_responses(runtime.client, [THROTTLED, ok])
    response = fresh_handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 200
    assert body_of(response)["variant"] == "AllTraffic"
    assert len(calls) == 2


def test_model_error_is_not_retried(fresh_handler, context):
    runtime = fresh_handler.get_runtime(context)
    model_error = (
        424,
        {"x-amzn-ErrorType": "ModelError:http://internal"},
        b'{"Message": "Received server error (500) from primary", "OriginalStatusCode": 500}',
    )
    calls = _wire_responses(runtime.client, [model_error, model_error])
    response = fresh_handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 502
    assert len(calls) == 1  # a failed generation is not worth a second expensive try


def _raise_before_send(exc):
    def handler(**kwargs):
        raise exc

    return handler


def test_read_timeout_maps_to_504(one_attempt, fresh_handler, context):
    runtime = fresh_handler.get_runtime(context)
    runtime.client.meta.events.register(
        "before-send.sagemaker-runtime.InvokeEndpoint",
        _raise_before_send(ReadTimeoutError(endpoint_url="http://x")),
    )
    response = fresh_handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 504
    assert body_of(response)["error_type"] == "EndpointTimeout"


def test_connection_failure_maps_to_502(one_attempt, fresh_handler, context):
    runtime = fresh_handler.get_runtime(context)
    runtime.client.meta.events.register(
        "before-send.sagemaker-runtime.InvokeEndpoint",
        _raise_before_send(EndpointConnectionError(endpoint_url="http://x")),
    )
    response = fresh_handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 502
    assert body_of(response)["error_type"] == "EndpointUnavailable"


# The model server gave up on the request (queue expiry, deadline, shutdown) but still answered 200: with
# the finish reason read, the caller gets a clear, retryable error instead of {"answer": ""}.
@pytest.mark.parametrize(
    ("reason", "text", "status", "error_type"),
    [
        ("timeout", "", 504, "EndpointTimeout"),  # expired in the server's queue: no text at all
        ("timeout", "Amazon SageMaker is", 504, "EndpointTimeout"),  # cut off by the deadline mid-answer
        ("cancelled", "", 503, "EndpointUnavailable"),
    ],
)
def test_a_generation_the_server_gave_up_on_is_an_error_not_an_answer(
    stubbed, context, reason, text, status, error_type
):
    handler, stubber = stubbed
    body = model_output(text, finish_reason=reason)
    stubber.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body))})
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == status, response
    assert body_of(response)["error_type"] == error_type
    assert "answer" not in body_of(response)


@pytest.mark.parametrize("reason", ["length", "eos_token", "stop_sequence", None])
def test_a_finished_generation_is_an_answer_whatever_its_finish_reason(stubbed, context, capsys, reason):
    handler, stubber = stubbed
    body = model_output(finish_reason=reason)
    stubber.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body))})
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 200 and body_of(response)["answer"] == ANSWER
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event": "request"' in line]
    assert logged[-1]["finish_reason"] == reason


def test_the_queue_expiry_answer_of_the_model_server_is_a_504(one_attempt, stubbed, context):
    """The model server answers 504 with its error shape when a request expired in its queue."""
    handler, stubber = stubbed
    stubber.add_client_error(
        "invoke_endpoint",
        service_error_code="ModelError",
        service_message="Received server error (504) from primary",
        http_status_code=424,
        modeled_fields={
            "OriginalStatusCode": 504,
            "OriginalMessage": json.dumps({"error": "the request waited 25 s in the queue", "error_type": "timeout"}),
        },
    )
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 504
    assert body_of(response)["error_type"] == "EndpointTimeout"


@pytest.mark.parametrize("raw", [b"not json", b'{"text": "x"}', b"[]"])
def test_unexpected_model_output_is_502(stubbed, context, raw):
    handler, stubber = stubbed
    stubber.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(raw), len(raw))})
    response = handler.handler(ask_event({"question": QUESTION}), context)
    assert response["statusCode"] == 502
    assert body_of(response)["error_type"] == "BadModelResponse"


# --- cold start, client settings, logs ----------------------------------------------------------------


def test_client_is_created_once_with_standard_retries_and_a_bounded_read_timeout(fresh_handler, context):
    first = fresh_handler.get_runtime(context)
    assert fresh_handler.get_runtime(context) is first
    config = first.client.meta.config
    assert config.retries["mode"] == "standard"
    # botocore makes one attempt; the function retries fast failures itself, never a read timeout (the endpoint
    # would still be generating the first answer), so one attempt may use the budget:
    # 29 s function - 1 s to answer - 2 attempts x 2 s connect = 24 s, under the 25 s cap.
    assert config.retries["total_max_attempts"] == 1
    assert config.read_timeout == pytest.approx(24.0, abs=0.1)
    assert config.read_timeout + config.connect_timeout * 2 < context.timeout_s


def test_short_function_timeout_shrinks_the_read_timeout(fresh_handler):
    from lambda_fn.events_helpers import FakeLambdaContext

    runtime = fresh_handler.get_runtime(FakeLambdaContext(timeout_s=10.0))
    assert runtime.client.meta.config.read_timeout <= 10 - 1 - 2 * 2 + 0.1


def test_import_does_no_work():
    """Importing the handler with an empty environment must not fail: no env reads, no network."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO / "lambda" / "src")}
    result = subprocess.run(
        [sys.executable, "-c", "import qa_function.handler as h; assert h._runtime is None"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_logs_are_json_and_never_contain_user_text(stubbed, context, capsys):
    handler, stubber = stubbed
    secret_question = "My password is hunter2, what is SageMaker?"
    stub_answer(stubber, text="The secret answer text")
    handler.handler(ask_event({"question": secret_question}), context)
    handler.handler(ask_event(b'{"question": "bad json hunter2'), context)

    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    requests = [r for r in records if r["event"] == "request"]
    assert [r["status"] for r in requests] == [200, 400]
    assert requests[0]["question_chars"] == len(secret_question)
    assert requests[0]["variant"] == "AllTraffic"
    joined = "\n".join(lines)
    assert "hunter2" not in joined
    assert "secret answer" not in joined


def test_event_files_round_trip_through_parse_event():
    from qa_function.handler import parse_event

    v1 = parse_event(load_event("rest_v1_ask.json"))
    v2 = parse_event(load_event("http_v2_ask.json"))
    assert (v1.method, v1.path, v1.payload_version) == ("POST", "/ask", "1.0")
    assert (v2.method, v2.path, v2.payload_version) == ("POST", "/ask", "2.0")
    assert json.loads(v2.body) == {"question": QUESTION}
    assert v1.headers["x-api-key"] == "test-key-0123456789abcdef"
    assert base64.b64encode(v2.body).decode() == load_event("http_v2_ask.json")["body"]
    assert copy.deepcopy(v1) == v1
