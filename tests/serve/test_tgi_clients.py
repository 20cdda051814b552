"""TGI's own clients, unmodified, against the real server (`containers/serve/serve`: gunicorn, tiny model) over
HTTP: Hugging Face's `text-generation` client and huggingface_hub's InferenceClient. Both post to the URL they
are given, so they are pointed at /invocations; they send every field of TGI's schema, nulls included."""

from __future__ import annotations

import warnings

import huggingface_hub
import pytest

pytestmark = pytest.mark.slow

Q = "What solutions come pre-built with Amazon SageMaker JumpStart?"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, serve_process):
    with serve_process.ready(
        tiny_model_dir, tmp_path_factory.mktemp("tgi-clients"), SERVE_MAX_NEW_TOKENS="64"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def url(server) -> str:
    return f"http://127.0.0.1:{server.port}/invocations"


# ----- text-generation (text_generation.Client) -----


@pytest.fixture
def text_generation():
    """The module; `make venv` installs it apart, with --no-deps (requirements-dev.txt says why)."""
    import text_generation

    return text_generation


def test_text_generation_generate_with_details_top_tokens_and_prefill(url, text_generation):
    client = text_generation.Client(url, timeout=60)
    response = client.generate(Q, max_new_tokens=6, top_n_tokens=3, decoder_input_details=True)
    details = response.details
    assert response.generated_text == "".join(t.text for t in details.tokens if not t.special)
    assert details.generated_tokens == len(details.tokens) == len(details.top_tokens) <= 6
    assert details.finish_reason in ("length", "eos_token")
    assert details.seed is None  # greedy
    for token, top in zip(details.tokens, details.top_tokens, strict=True):
        assert len(top) == 3 and top[0].id == token.id
        assert top[0].logprob >= top[1].logprob >= top[2].logprob
    assert details.prefill[0].logprob is None
    assert len(details.prefill) > 1 and all(t.logprob is not None for t in details.prefill[1:])
    assert details.best_of_sequences is None


def test_text_generation_generate_stream(url, text_generation):
    client = text_generation.Client(url, timeout=60)
    expected = client.generate(Q, max_new_tokens=6).generated_text
    frames = list(client.generate_stream(Q, max_new_tokens=6, top_n_tokens=2))
    assert len(frames) == 6
    assert all(f.generated_text is None and f.details is None for f in frames[:-1])
    assert frames[-1].generated_text == expected
    assert frames[-1].details.finish_reason == "length" and frames[-1].details.generated_tokens == 6
    assert all(len(f.top_tokens) == 2 and f.top_tokens[0].id == f.token.id for f in frames)


def test_text_generation_sampling_knobs_and_seed(url, text_generation):
    client = text_generation.Client(url, timeout=60)
    knobs = dict(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, typical_p=0.9, repetition_penalty=1.1)
    a = client.generate(Q, seed=11, **knobs)  # do_sample=False is sent: the knobs sample anyway, as on TGI
    b = client.generate(Q, seed=11, **knobs)
    assert a.details.seed == 11 and a.generated_text == b.generated_text
    assert len(a.generated_text) >= 5, a  # byte-level tiny model: a character a token
    stopped = client.generate(Q, stop_sequences=[a.generated_text[3:5]], seed=11, **knobs)
    assert stopped.details.finish_reason == "stop_sequence"
    assert a.generated_text.startswith(stopped.generated_text)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"best_of": 2, "do_sample": True}, "best_of"),
        ({"watermark": True}, "watermark"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"top_n_tokens": 6}, "top_n_tokens"),
    ],
)
def test_text_generation_refusals_arrive_as_its_validation_error(url, text_generation, kwargs, field):
    client = text_generation.Client(url, timeout=60)
    with pytest.raises(text_generation.errors.ValidationError, match=rf"parameters\.{field}"):
        client.generate(Q, max_new_tokens=2, **kwargs)


# ----- huggingface_hub.InferenceClient -----


@pytest.fixture
def hub_client(url):
    return huggingface_hub.InferenceClient(base_url=url, timeout=60)


def test_inference_client_text_generation(hub_client):
    text = hub_client.text_generation(Q, max_new_tokens=6)
    assert isinstance(text, str) and text
    output = hub_client.text_generation(Q, max_new_tokens=6, details=True, decoder_input_details=True, top_n_tokens=2)
    assert output.generated_text == text
    details = output.details
    assert details.generated_tokens == len(details.tokens) <= 6
    assert details.prefill[0].logprob is None and details.prefill[1].logprob is not None
    assert [len(top) for top in details.top_tokens] == [2] * len(details.tokens)


def test_inference_client_text_generation_stream(hub_client):
    expected = hub_client.text_generation(Q, max_new_tokens=6)
    pieces = list(hub_client.text_generation(Q, max_new_tokens=6, stream=True))
    assert "".join(pieces) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not served via TGI" fallback: every parameter was understood
        outputs = list(hub_client.text_generation(Q, max_new_tokens=6, stream=True, details=True, top_n_tokens=1))
    assert outputs[-1].generated_text == expected
    assert outputs[-1].details.finish_reason == "length" and outputs[-1].details.generated_tokens == 6
    assert all(o.details is None for o in outputs[:-1])
    assert all(o.top_tokens[0].id == o.token.id for o in outputs)


def test_inference_client_refusal_names_the_field(hub_client):
    with pytest.raises(huggingface_hub.errors.ValidationError, match=r"parameters\.grammar"):
        hub_client.text_generation(Q, max_new_tokens=2, grammar={"type": "regex", "value": "[a-z]+"})
