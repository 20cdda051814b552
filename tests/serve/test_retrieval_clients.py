"""The common clients, unmodified, against the real server (`containers/serve/serve`: gunicorn) serving an artifact
with a retrieval index: replies carry `sources`, an extra key that TGI's `text_generation` client ignores,
huggingface_hub keeps as an attribute, and OpenAI's client keeps in `model_extra`."""

from __future__ import annotations

import huggingface_hub
import pytest
from fixtures.serve_retrieval import PASSAGES, copy_with_retrieval
from openai import OpenAI

pytestmark = pytest.mark.slow

Q = "What is SageMaker JumpStart?"
JUMPSTART = PASSAGES[4]["title"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, serve_process):
    model_dir = copy_with_retrieval(tiny_model_dir, tmp_path_factory.mktemp("rag-clients-model") / "model")
    with serve_process.ready(model_dir, tmp_path_factory.mktemp("rag-clients"), SERVE_MAX_NEW_TOKENS="64") as server:
        yield server


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def test_text_generation_client_reads_replies_with_sources(base_url):
    import text_generation

    client = text_generation.Client(f"{base_url}/invocations", timeout=60)
    response = client.generate(Q, max_new_tokens=4)
    assert response.details.generated_tokens == 4
    frames = list(client.generate_stream(Q, max_new_tokens=4))
    assert len(frames) == 4 and frames[-1].generated_text == response.generated_text


def test_inference_client_text_generation_keeps_sources(base_url):
    client = huggingface_hub.InferenceClient(base_url=f"{base_url}/invocations", timeout=60)
    output = client.text_generation(Q, max_new_tokens=4, details=True)
    assert output.sources[0]["title"] == JUMPSTART
    streamed = list(client.text_generation(Q, max_new_tokens=4, stream=True, details=True))
    assert streamed[-1].generated_text == output.generated_text
    assert streamed[-1].sources == output.sources


def test_inference_client_chat_completion_keeps_sources(base_url):
    client = huggingface_hub.InferenceClient(base_url=base_url, timeout=60)
    reply = client.chat_completion([{"role": "user", "content": Q}], max_tokens=4)
    assert reply.sources[0]["title"] == JUMPSTART
    chunks = list(client.chat_completion([{"role": "user", "content": Q}], max_tokens=4, stream=True))
    assert chunks[-1].sources == reply.sources


def test_openai_client_keeps_sources_in_model_extra(base_url):
    client = OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": Q}]
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=4)
    assert reply.model_extra["sources"][0]["title"] == JUMPSTART
    off = client.chat.completions.create(model="m", messages=messages, max_tokens=4, extra_body={"retrieval": False})
    assert "sources" not in (off.model_extra or {})
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=4, stream=True))
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.model_extra["sources"] for c in finishing] == [reply.model_extra["sources"]]
