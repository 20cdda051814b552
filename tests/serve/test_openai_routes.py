"""The OpenAI-compatible routes in-process (Flask test client), on the real tiny model and engine: reply and chunk
shapes, n, stop, logprobs, usage, /v1/models, and errors in OpenAI's shape (while /invocations keeps its own)."""

from __future__ import annotations

import json

import pytest
from serve import create_app
from serve.generation import GenerationError, GenerationHandle
from serve.schemas import MAX_CHOICES

Q = "What solutions come pre-built with Amazon SageMaker JumpStart?"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": Q}]


def chat(client, **fields):
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **fields})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def complete(client, prompt=Q, **fields):
    response = client.post("/v1/completions", json={"prompt": prompt, **fields})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def sse_frames(response) -> list:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    body = b"".join(response.response).decode()
    frames = []
    for block in body.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        frames.append(data if data == "[DONE]" else json.loads(data))
    assert frames[-1] == "[DONE]"
    return frames[:-1]


def streamed_texts(chunks, key) -> dict[int, str]:
    """Each choice's text, from the chunks: key(choice) is its text part."""
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (key(choice) or "")
    return texts


# ----- chat completions -----


def test_chat_completion_object_names_the_served_model_whatever_the_request_says(client, predictor):
    body = chat(client, model="dummy", max_tokens=6, temperature=0)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == predictor.model_name
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_on_v1_and_on_invocations_answer_alike(client):
    request = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    v1 = client.post("/v1/chat/completions", json=request).get_json()
    invocations = client.post("/invocations", json=request).get_json()
    assert v1["choices"] == invocations["choices"] and v1["usage"] == invocations["usage"]


def test_n_choices_sample_with_their_own_seeds_and_count_the_prompt_once(client):
    one = chat(client, max_tokens=8, temperature=0)
    body = chat(client, n=3, max_tokens=8, temperature=1.0, seed=11)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) > 1, texts  # seeds 11, 12, 13
    assert chat(client, n=3, max_tokens=8, temperature=1.0, seed=11)["choices"] == body["choices"]  # reproducible
    assert body["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == sum(
        len(c["logprobs"]["content"]) for c in chat(client, n=3, max_tokens=8, seed=11, logprobs=True)["choices"]
    )


def test_n_greedy_choices_are_the_same_answer(client):
    body = chat(client, n=2, max_tokens=6, temperature=0)
    assert body["choices"][0]["message"] == body["choices"][1]["message"]


def test_stop_string_ends_the_answer_before_it(client):
    full = chat(client, max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
    stop = full[6:9]
    assert stop and stop in full
    [choice] = chat(client, max_tokens=12, temperature=0, stop=stop)["choices"]
    assert choice["message"]["content"] == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_chat_stream_of_n_choices_with_usage(client):
    request = {"max_tokens": 8, "temperature": 0}
    answer = chat(client, **request)["choices"][0]["message"]["content"]
    response = client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, **request, "n": 2, "stream": True, "stream_options": {"include_usage": True}},
    )
    chunks = sse_frames(response)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    *choice_chunks, usage = chunks
    # As OpenAI: the last chunk has the usage and no choices; every other has usage null.
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in choice_chunks)
    texts = streamed_texts(choice_chunks, lambda choice: choice["delta"].get("content"))
    assert texts == {0: answer, 1: answer}
    for index in (0, 1):
        mine = [c["choices"][0] for c in choice_chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_chat_stream_without_include_usage_has_no_usage(client):
    chunks = sse_frames(
        client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "stream": True})
    )
    assert all("usage" not in c for c in chunks)


# ----- logprobs -----


def test_chat_logprobs_with_top_logprobs(client):
    body = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    [choice] = body["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        alternatives = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert alternatives == sorted(alternatives, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)


def test_chat_logprobs_without_top_logprobs_has_empty_alternatives(client):
    content = chat(client, max_tokens=4, temperature=0, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert content and all(entry["top_logprobs"] == [] for entry in content)


def test_chat_stream_logprobs_are_the_replys(client):
    request = {"max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = chat(client, **request)["choices"][0]["logprobs"]["content"]
    chunks = sse_frames(client.post("/v1/chat/completions", json={"messages": MESSAGES, **request, "stream": True}))
    streamed = [e for c in chunks for e in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == whole


def test_invocations_chat_gains_n_and_logprobs(client):
    body = client.post(
        "/invocations", json={"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "n": 2, "logprobs": True}
    ).get_json()
    assert len(body["choices"]) == 2 and len(body["choices"][1]["logprobs"]["content"]) >= 1


def test_invocations_streams_one_choice_only(client):
    response = client.post("/invocations", json={"messages": MESSAGES, "n": 2, "stream": True})
    assert response.status_code == 422
    assert response.get_json()["error"].startswith("n: ")


def test_invocations_takes_the_completions_shape_as_v1_does(client):
    """SageMaker forwards only /invocations: a `prompt` body there is OpenAI's completions request."""
    fields = {"max_tokens": 6, "temperature": 0}
    expected = complete(client, **fields)["choices"]
    assert client.post("/invocations", json={"prompt": Q, **fields}).get_json()["choices"] == expected
    chunks = sse_frames(client.post("/invocations", json={"prompt": Q, **fields, "stream": True}))
    assert streamed_texts(chunks, lambda choice: choice["text"]) == {0: expected[0]["text"]}
    response = client.post("/invocations", json={"prompt": [Q, Q], **fields, "stream": True})
    assert response.status_code == 422 and response.get_json()["error"].startswith("prompt: ")


def test_completion_logprobs_tokens_offsets_and_top(client):
    body = complete(client, max_tokens=6, temperature=0, logprobs=2)
    [choice] = body["choices"]
    logprobs = choice["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert all(len(logprobs[key]) == n for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"))
    offset = 0
    for token, logprob, top, text_offset in zip(*(logprobs[k] for k in logprobs), strict=True):
        assert text_offset == offset
        offset += len(token)
        assert logprob <= 0
        assert token in top and len(top) <= 3  # the 2 most likely, and the chosen token always
        assert top[token] == pytest.approx(logprob, abs=1e-4)


def test_completion_stream_logprobs_continue_the_offsets(client):
    request = {"prompt": Q, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    whole = complete(client, **{k: v for k, v in request.items() if k != "prompt"})["choices"][0]["logprobs"]
    chunks = sse_frames(client.post("/v1/completions", json={**request, "stream": True}))
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [t for p in parts for t in p["tokens"]] == whole["tokens"]
    assert [o for p in parts for o in p["text_offset"]] == whole["text_offset"]


# ----- completions -----


def test_completion_is_raw_text_like_invocations_without_the_chat_template(client):
    body = complete(client, max_tokens=6, temperature=0)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    raw = client.post(
        "/invocations",
        json={"inputs": Q, "parameters": {"max_new_tokens": 6, "apply_chat_template": False, "details": True}},
    ).get_json()[0]
    [choice] = body["choices"]
    assert choice["text"] == raw["generated_text"]
    assert body["usage"]["prompt_tokens"] == raw["details"]["input_length"]
    assert choice["logprobs"] is None


def test_completion_list_of_prompts_times_n_in_openai_order(client):
    prompts = [Q, "hello there"]
    singles = [complete(client, p, max_tokens=4, temperature=0) for p in prompts]
    body = complete(client, prompts, n=2, max_tokens=4, temperature=0)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts == [singles[0]["choices"][0]["text"]] * 2 + [singles[1]["choices"][0]["text"]] * 2
    assert body["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)


def test_completion_echo_puts_the_prompt_first(client):
    plain = complete(client, max_tokens=4, temperature=0)["choices"][0]["text"]
    assert complete(client, max_tokens=4, temperature=0, echo=True)["choices"][0]["text"] == Q + plain
    chunks = sse_frames(
        client.post(
            "/v1/completions", json={"prompt": Q, "max_tokens": 4, "echo": True, "stream": True, "temperature": 0}
        )
    )
    assert streamed_texts(chunks, lambda choice: choice["text"]) == {0: Q + plain}


def test_completion_stream_of_two_prompts_with_usage(client):
    prompts = [Q, "hello there"]
    whole = complete(client, prompts, max_tokens=5, temperature=0)
    chunks = sse_frames(
        client.post(
            "/v1/completions",
            json={"prompt": prompts, "max_tokens": 5, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}},
        )
    )  # fmt: skip
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    texts = streamed_texts(chunks[:-1], lambda choice: choice["text"])
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    finish = [ch["finish_reason"] for c in chunks[:-1] for ch in c["choices"] if ch["finish_reason"]]
    assert finish == [c["finish_reason"] for c in whole["choices"]]


def test_completions_serve_a_model_without_a_chat_template(tiny_plain_model_dir, make_config_for, start_predictor):
    predictor = start_predictor(make_config_for(tiny_plain_model_dir))
    client = create_app(predictor.config, predictor=predictor).test_client()
    assert complete(client, max_tokens=3)["choices"][0]["text"] is not None
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "messages"


# ----- /v1/models -----


def test_models_lists_the_one_served_model(client, predictor):
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == predictor.model_name and card["object"] == "model"
    assert isinstance(card["created"], int) and card["owned_by"]
    assert client.get(f"/v1/models/{predictor.model_name}").get_json()["id"] == predictor.model_name
    missing = client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404
    assert missing.get_json()["error"]["code"] == "model_not_found"


# ----- errors in OpenAI's shape -----


def assert_openai_error(response, status, param=None, code=None, mentions=None):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if mentions is not None:
        assert mentions in error["message"], error
    return error


BAD_CHAT = [
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"n": MAX_CHOICES + 1}, "n"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"max_tokenz": 3}, "max_tokenz"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_fields_are_400_naming_the_field(client, fields, param):
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **fields})
    error = assert_openai_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_a_prompt_longer_than_the_context_is_400(client, predictor):
    long = "x " * predictor.context_length
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
    assert_openai_error(response, 400, param="messages", mentions="context")
    assert_openai_error(client.post("/v1/completions", json={"prompt": ["hi", long]}), 400, param="prompt.1")


BAD_COMPLETION = [
    ({"prompt": [1, 2, 3]}, "prompt", "token-id"),
    ({"prompt": ""}, "prompt", None),
    ({"best_of": 3}, "best_of", None),
    ({"suffix": "end"}, "suffix", None),
    ({"logprobs": 6}, "logprobs", None),
    ({"logprobs": 1, "echo": True}, "echo", None),
    ({"prompt": ["a"] * 5, "n": 8}, "n", None),  # 40 generations
]


@pytest.mark.parametrize(("fields", "param", "mentions"), BAD_COMPLETION, ids=[p for _, p, _ in BAD_COMPLETION])
def test_bad_completion_fields_are_400_naming_the_field(client, fields, param, mentions):
    response = client.post("/v1/completions", json={"prompt": Q, **fields})
    assert_openai_error(response, 400, param=param, mentions=mentions)


def test_fields_that_ask_for_nothing_are_accepted(client):
    neutral = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "parallel_tool_calls": True,
        "user": "someone",
        "metadata": {"k": "v"},
        "store": False,
        "max_tokens": 2,
    }
    chat(client, **neutral)
    complete(client, **{k: neutral[k] for k in ("presence_penalty", "frequency_penalty", "logit_bias", "user")},
             max_tokens=2, best_of=1, suffix="")  # fmt: skip


def test_other_errors_keep_their_status_in_openai_shape(client):
    assert_openai_error(
        client.post("/v1/chat/completions", data=b'{"messages": ', content_type="application/json"),
        400,
        code="bad_request",
    )
    assert_openai_error(client.post("/v1/completions", data=b"[1]", content_type="application/json"), 400)
    assert_openai_error(client.post("/v1/completions", data=b"a,b", content_type="text/csv"), 415)
    assert_openai_error(client.get("/v1/chat/completions"), 405)
    assert_openai_error(client.post("/v1/embeddings", json={"input": "x"}), 404)


def test_invocations_keeps_its_own_error_shape(client):
    response = client.post("/invocations", json={"messages": MESSAGES, "presence_penalty": 0.5})
    assert response.status_code == 422
    assert set(response.get_json()) == {"error", "error_type"}
    assert response.get_json()["error"].startswith("presence_penalty: ")


def test_not_ready_is_503_in_openai_shape(predictor):
    class Loading:
        config, state, reason, model_name = predictor.config, "loading", None, "x"

        def health(self):
            return "the model is loading"

    client = create_app(predictor.config, predictor=Loading()).test_client()
    error = assert_openai_error(client.post("/v1/completions", json={"prompt": "hi"}), 503, code="not_ready")
    assert error["type"] == "server_error"
    assert_openai_error(client.get("/v1/models"), 503)


def test_a_failure_after_the_stream_began_is_an_error_frame_then_done(client, monkeypatch):
    original = GenerationHandle.events

    def failing(self, timeout=None):
        events = original(self, timeout)
        yield next(events)
        raise GenerationError("the step failed")

    monkeypatch.setattr(GenerationHandle, "events", failing)
    chunks = sse_frames(
        client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8, "stream": True})
    )
    error = chunks[-1]["error"]
    assert error["type"] == "server_error" and "the step failed" in error["message"]
