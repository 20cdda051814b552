"""The common clients, unmodified, against the real server (`containers/serve/serve`: gunicorn, tiny model) on
loopback: OpenAI's `openai` package (base_url .../v1) and huggingface_hub's InferenceClient (base_url = the
server; it posts to <base_url>/v1/chat/completions)."""

from __future__ import annotations

import pytest
from huggingface_hub import InferenceClient
from openai import BadRequestError, OpenAI

pytestmark = pytest.mark.slow

Q = "What solutions come pre-built with Amazon SageMaker JumpStart?"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": Q}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, serve_process):
    with serve_process.ready(
        tiny_model_dir, tmp_path_factory.mktemp("openai-server"), SERVE_MAX_NEW_TOKENS="64"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def base_url(server):
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def openai_client(base_url):
    return OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served_model(openai_client):
    [model] = openai_client.models.list().data
    return model.id


# ----- openai -----


def test_openai_models_list_and_retrieve(openai_client, served_model):
    assert served_model
    assert openai_client.models.retrieve(served_model).id == served_model


def test_openai_chat_completion_with_logprobs_and_n(openai_client, served_model):
    reply = openai_client.chat.completions.create(
        model=served_model, messages=MESSAGES, max_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=2
    )
    assert reply.object == "chat.completion" and reply.model == served_model
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy
    for choice in reply.choices:
        assert choice.finish_reason in ("stop", "length")
        content = choice.logprobs.content
        assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
        assert all(t.bytes == list(t.token.encode()) for t in content)
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)


def test_openai_chat_stream_with_usage_is_the_same_answer(openai_client, served_model):
    request = dict(model=served_model, messages=MESSAGES, max_tokens=8, temperature=0)
    whole = openai_client.chat.completions.create(**request)
    chunks = list(openai_client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"]


def test_openai_chat_stream_with_logprobs_and_n(openai_client, served_model):
    stream = openai_client.chat.completions.create(
        model=served_model, messages=MESSAGES, max_tokens=5, n=2, seed=3, stream=True, logprobs=True, top_logprobs=1
    )
    tokens: dict[int, int] = {}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                tokens[choice.index] = tokens.get(choice.index, 0) + len(choice.logprobs.content)
    assert tokens == {0: 5, 1: 5}


def test_openai_completions(openai_client, served_model):
    reply = openai_client.completions.create(
        model=served_model, prompt=[Q, "hello"], max_tokens=5, temperature=0, logprobs=2
    )
    assert reply.object == "text_completion" and len(reply.choices) == 2
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 5
    assert all(token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True))
    streamed = "".join(
        chunk.choices[0].text
        for chunk in openai_client.completions.create(
            model=served_model, prompt=Q, max_tokens=5, temperature=0, stream=True
        )
    )
    assert streamed == reply.choices[0].text


def test_openai_client_raises_bad_request_naming_the_field(openai_client, served_model):
    with pytest.raises(BadRequestError) as raised:
        openai_client.chat.completions.create(model=served_model, messages=MESSAGES, presence_penalty=0.5)
    assert raised.value.status_code == 400
    assert raised.value.param == "presence_penalty" and raised.value.code == "validation"


# ----- huggingface_hub -----


def test_huggingface_hub_chat_completion(base_url, openai_client, served_model):
    client = InferenceClient(base_url=base_url)
    reply = client.chat_completion(MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    expected = openai_client.chat.completions.create(model=served_model, messages=MESSAGES, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.model == served_model
    assert len(reply.choices[0].logprobs.content[0].top_logprobs) == 2
    assert reply.usage.completion_tokens == expected.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            messages=MESSAGES, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
