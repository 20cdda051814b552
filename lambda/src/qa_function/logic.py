"""Pure request/response logic: no AWS event shapes, no network, no environment.

handler.py turns an API Gateway event into bytes and headers, calls these functions, and turns their
results back into a proxy response.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qa_function.config import FunctionConfig

ALLOWED_METHODS = "OPTIONS, POST"
# Request headers a browser may send cross-origin. x-api-key is API Gateway's usage-plan key.
ALLOWED_REQUEST_HEADERS = ("content-type", "x-api-key", "authorization")
VARIANT_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")

# Generation parameters the function forwards (TGI names). Anything else is rejected, so a typo such as
# "max_tokens" gets a 400 that names the right key instead of being ignored silently.
MAX_NEW_TOKENS_LIMIT = 1024


def _int_in(lo: int, hi: int):
    def check(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    return check, f"an integer from {lo} to {hi}"


def _float_in(lo: float, hi: float, lo_open: bool = False):
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (lo < v if lo_open else lo <= v) and v <= hi

    return check, f"a number {'>' if lo_open else '>='} {lo} and <= {hi}"


def _stop_list(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) <= 4
        and all(isinstance(s, str) and 0 < len(s) <= 64 and _is_unicode_text(s) for s in v)
    )


PARAMETER_RULES: dict[str, tuple[Any, str]] = {
    "max_new_tokens": _int_in(1, MAX_NEW_TOKENS_LIMIT),
    "temperature": _float_in(0.0, 2.0),
    "top_p": _float_in(0.0, 1.0, lo_open=True),
    "top_k": _int_in(1, 1000),
    # The model server refuses penalties under 0.01 (they overflow the logits); refuse them here, as a 400.
    "repetition_penalty": _float_in(0.01, 10.0),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "seed": _int_in(0, 2**32 - 1),
    "stop": (_stop_list, "a list of at most 4 non-empty strings"),
}
REQUEST_KEYS = ("question", "parameters", "target_variant", "retrieval")

# The model server answers with the passages its retrieval index put in the prompt, when its artifact has one:
# `"sources": [{"id", "title", "source", "score"}]` beside `generated_text`. They cross a trust boundary (the
# endpoint may run any image, the index may hold any text), so the function keeps at most MAX_SOURCES
# well-formed entries, collapses whitespace, cuts strings to these lengths, and drops malformed entries
# instead of failing an answer over them.
MAX_SOURCES = 10
MAX_SOURCE_TITLE_CHARS = 200
MAX_SOURCE_REF_CHARS = 200

# The serving container reports why generation ended in TGI's `details.finish_reason` ("length",
# "eos_token", "stop_sequence"), plus its own reasons for a request it gave up on: "timeout" (it waited in
# the queue, or ran, past its deadline) and "cancelled" (the server is shutting down). Those are not
# answers, even when some text came back: the caller gets a retryable error, never an empty or cut-off
# answer that looks complete.
UNFINISHED_REASONS = {
    "timeout": (504, "EndpointTimeout", "The model ran out of time before it finished the answer"),
    "cancelled": (503, "EndpointUnavailable", "The model endpoint cancelled the request; retry in a moment"),
}


class RequestError(Exception):
    """The caller's request cannot be served as sent (4xx)."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


class UpstreamError(Exception):
    """The model endpoint failed or could not be reached (5xx or 429 for the caller)."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


@dataclass(frozen=True)
class AskRequest:
    question: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    target_variant: str | None = None
    retrieval: bool = True
    """False: the endpoint answers without looking up passages (`parameters.retrieval: false`)."""


@dataclass(frozen=True)
class Source:
    """A passage the model was shown, as the caller sees it: what it is called and where it comes from."""

    title: str
    source: str


@dataclass(frozen=True)
class ModelOutput:
    text: str
    finish_reason: str | None  # None when the server sent no details
    sources: tuple[Source, ...] | None = None  # None when the server sent no `sources` (no index, retrieval off)
    sources_dropped: int = 0  # entries of the server's `sources` that were malformed or over MAX_SOURCES


@dataclass(frozen=True)
class Answer:
    text: str
    variant: str | None
    latency_ms: float
    finish_reason: str | None = None
    sources: tuple[Source, ...] | None = None
    sources_dropped: int = 0


def parse_ask_request(body: bytes, config: FunctionConfig) -> AskRequest:
    """Validate a POST /ask body:
    {"question": str, "parameters": {...}?, "target_variant": str?, "retrieval": bool?}."""
    if len(body) > config.max_body_bytes:
        raise RequestError(
            413, "PayloadTooLarge", f"Request body is {len(body)} bytes; the limit is {config.max_body_bytes}"
        )
    if not body.strip():
        raise RequestError(400, "BadRequest", 'Request body is empty; send JSON like {"question": "..."}')
    try:
        payload = json.loads(body)
    except RecursionError as e:  # json.loads recurses once per nesting level
        raise RequestError(400, "InvalidJSON", "Request body is JSON nested too deeply") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, "InvalidJSON", f"Request body is not valid JSON: {e}") from e
    if not isinstance(payload, dict):
        raise RequestError(400, "BadRequest", 'Request body must be a JSON object like {"question": "..."}')
    unknown = sorted(set(payload) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(400, "BadRequest", f"Unknown field(s) {unknown}; allowed fields: {list(REQUEST_KEYS)}")

    question = payload.get("question")
    if question is None:
        raise RequestError(400, "BadRequest", 'Field "question" is required')
    if not isinstance(question, str):
        raise RequestError(400, "BadRequest", 'Field "question" must be a string')
    question = question.strip()
    if not _is_unicode_text(question):
        raise RequestError(400, "BadRequest", 'Field "question" holds a lone UTF-16 surrogate; send valid Unicode text')
    if not question:
        raise RequestError(400, "BadRequest", 'Field "question" must not be empty')
    if len(question) > config.max_question_chars:
        raise RequestError(
            413,
            "QuestionTooLong",
            f"Question is {len(question)} characters; the limit is {config.max_question_chars}",
        )

    parameters = _validate_parameters(payload.get("parameters"))
    target_variant = _validate_target_variant(payload.get("target_variant"), config)
    retrieval = payload.get("retrieval", True)
    if not isinstance(retrieval, bool):  # null too: the schema says boolean, as for the parameters
        raise RequestError(400, "BadRequest", 'Field "retrieval" must be true or false')
    return AskRequest(question=question, parameters=parameters, target_variant=target_variant, retrieval=retrieval)


def _is_unicode_text(text: str) -> bool:
    """False for strings with lone surrogates (JSON's "\\ud800" escapes): no model tokenizer accepts them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _validate_parameters(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RequestError(400, "BadRequest", 'Field "parameters" must be a JSON object')
    unknown = sorted(set(raw) - set(PARAMETER_RULES))
    if unknown:
        hint = '; "retrieval" goes at the top level, beside "question"' if "retrieval" in unknown else ""
        raise RequestError(
            400, "BadRequest", f"Unknown parameter(s) {unknown}; allowed: {sorted(PARAMETER_RULES)}{hint}"
        )
    for name, value in raw.items():
        check, expected = PARAMETER_RULES[name]
        if not check(value):
            raise RequestError(400, "BadRequest", f'Parameter "{name}" must be {expected}')
    return dict(raw)


def _validate_target_variant(raw: Any, config: FunctionConfig) -> str | None:
    if raw is None:
        return None
    if not config.allow_target_variant:
        raise RequestError(400, "BadRequest", 'Field "target_variant" is disabled on this deployment')
    if not isinstance(raw, str) or len(raw) > 63 or not VARIANT_NAME_RE.match(raw):
        raise RequestError(400, "BadRequest", 'Field "target_variant" must be a production variant name')
    return raw


def invoke_body(request: AskRequest, config: FunctionConfig) -> bytes:
    """The serving container's TGI-style request: {"inputs": question, "parameters": {...}}, with
    `details` asked for so that the reply says why generation ended (see parse_model_output).
    `retrieval: false` is sent only when the caller turned retrieval off: on is the server's default, and
    a server without retrieval support (an older image) refuses parameters it does not know."""
    parameters = {"max_new_tokens": config.default_max_new_tokens, **request.parameters, "details": True}
    if not request.retrieval:
        parameters["retrieval"] = False
    return json.dumps({"inputs": request.question, "parameters": parameters}).encode()


def parse_model_output(body: bytes) -> ModelOutput:
    """Accept TGI's `[{"generated_text": ..., "details": {"finish_reason": ...}}]` (and the single-object
    form, and replies without details); anything else is a 502. A finish reason in UNFINISHED_REASONS is
    the error it names, whatever text came with it."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise UpstreamError(502, "BadModelResponse", "The model endpoint returned a body that is not JSON") from e
    if isinstance(payload, list) and payload:
        payload = payload[0]
    if not (isinstance(payload, dict) and isinstance(payload.get("generated_text"), str)):
        raise UpstreamError(502, "BadModelResponse", 'The model endpoint returned JSON without "generated_text"')
    details = payload.get("details")
    reason = details.get("finish_reason") if isinstance(details, dict) else None
    reason = reason if isinstance(reason, str) else None
    if reason in UNFINISHED_REASONS:
        raise UpstreamError(*UNFINISHED_REASONS[reason])
    sources, dropped = parse_sources(payload.get("sources"))
    return ModelOutput(
        text=payload["generated_text"].strip(), finish_reason=reason, sources=sources, sources_dropped=dropped
    )


def parse_sources(raw: Any) -> tuple[tuple[Source, ...] | None, int]:
    """The model server's `sources` -> (at most MAX_SOURCES Sources, how many entries were dropped).

    None (no `sources` key, or not a list) means the server did not retrieve. An entry counts when it is an
    object whose `title` and `source` are strings with something printable in them; anything else is
    dropped, not an error: the answer is still good. See _display_text for what is kept of the strings."""
    if not isinstance(raw, list):
        return None, 0
    kept: list[Source] = []
    for entry in raw:
        if len(kept) == MAX_SOURCES:
            break
        if not isinstance(entry, dict):
            continue
        title = _display_text(entry.get("title"), MAX_SOURCE_TITLE_CHARS)
        source = _display_text(entry.get("source"), MAX_SOURCE_REF_CHARS)
        if title and source:
            kept.append(Source(title=title, source=source))
    return tuple(kept), len(raw) - len(kept)


def _display_text(value: Any, limit: int) -> str:
    """One line of at most `limit` printable characters ("" for a non-string): whitespace runs become one
    space; control and format characters (bidi overrides, zero-width marks) and lone surrogates are removed;
    a longer string is cut and ends with "…"."""
    if not isinstance(value, str):
        return ""
    # Cut before cleaning, so that a multi-megabyte string costs no more than a short one.
    text = " ".join("".join(ch for ch in value[: limit * 4] if ch.isprintable() or ch.isspace()).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def success_body(answer: Answer) -> dict[str, Any]:
    body: dict[str, Any] = {
        "answer": answer.text,
        "variant": answer.variant,
        "latency_ms": round(answer.latency_ms, 1),
    }
    if answer.sources is not None:
        body["sources"] = [{"title": s.title, "source": s.source} for s in answer.sources]
    return body


def error_body(error_type: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message, "error_type": error_type}
    if request_id:
        body["request_id"] = request_id
    return body


def cors_headers(origin: str | None, config: FunctionConfig, *, preflight: bool = False) -> dict[str, str]:
    """CORS response headers for `origin`, or {} when it is not allowed (the browser then blocks the read).

    `*` is echoed as `*` only without credentials (config.py forbids the combination); otherwise the
    exact origin is echoed with `Vary: Origin` so caches keep per-origin copies.
    """
    if not origin or not config.cors_allow_origins:
        return {}
    if "*" in config.cors_allow_origins:
        headers = {"Access-Control-Allow-Origin": "*"}
    elif origin in config.cors_allow_origins:
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if config.cors_allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
    else:
        return {}
    if preflight:
        headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        headers["Access-Control-Allow-Headers"] = ", ".join(ALLOWED_REQUEST_HEADERS)
        headers["Access-Control-Max-Age"] = str(config.cors_max_age_s)
    return headers


def attempt_read_timeout(remaining_s: float, config: FunctionConfig) -> float:
    """Read timeout for InvokeEndpoint, so that the call ends before the function times out.

    Only fast failures (throttling, no connection) are retried, never a read timeout, so one attempt may use
    the whole budget: every attempt's connect time and one second to build the response are kept back.
    """
    budget = remaining_s - 1.0 - config.connect_timeout_s * config.max_attempts
    return max(1.0, min(config.read_timeout_s, budget))
