"""TGI's whole request schema on /invocations (Flask test client, tiny model, real engine): every field TGI's
clients send is accepted (null = unset), the ones not implemented are refused by name when set, and the ones
implemented here (typical_p, top_n_tokens, decoder_input_details) do what TGI does."""

from __future__ import annotations

import json
import math

import pytest
import torch
from serve.engine import Engine
from serve.generation import SamplingParams
from serve.token_chooser import NextTokenChooser, choose_next_tokens, typical_filter

from .conftest import reference_model

Q = "What solutions come pre-built with Amazon SageMaker JumpStart?"

# Every field of TGI's GenerateParameters (router/src/lib.rs), null or at its default: what TGI's clients send.
ALL_TGI_FIELDS_UNSET = {
    "best_of": None,
    "temperature": None,
    "repetition_penalty": None,
    "frequency_penalty": None,
    "top_k": None,
    "top_p": None,
    "typical_p": None,
    "do_sample": False,
    "max_new_tokens": 4,
    "return_full_text": None,
    "stop": [],
    "truncate": None,
    "watermark": False,
    "details": None,
    "decoder_input_details": False,
    "seed": None,
    "top_n_tokens": None,
    "grammar": None,
    "adapter_id": None,
}


def post(client, parameters, *, inputs=Q, stream=False):
    return client.post("/invocations", json={"inputs": inputs, "parameters": parameters, "stream": stream})


def ok(client, **parameters) -> dict:
    response = post(client, parameters)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()[0]


def sse_frames(response) -> list[dict]:
    body = b"".join(response.response).decode()
    return [json.loads(block.removeprefix("data: ")) for block in body.strip().split("\n\n")]


# ----- the schema -----


def test_every_tgi_field_unset_or_null_is_accepted_and_greedy(client):
    reply = ok(client, **ALL_TGI_FIELDS_UNSET)
    assert reply == ok(client, max_new_tokens=4)  # greedy, no details: the same as asking for nothing
    nulls = {name: None for name in ALL_TGI_FIELDS_UNSET}  # even the booleans and `stop` may be null
    assert ok(client, **nulls)["generated_text"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("best_of", 1), ("watermark", False), ("frequency_penalty", 0.0), ("frequency_penalty", 0)],
)
def test_unimplemented_fields_at_their_default_are_accepted(client, field, value):
    assert ok(client, max_new_tokens=2, **{field: value})["generated_text"] is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("best_of", 2),
        ("watermark", True),
        ("frequency_penalty", 0.5),
        ("grammar", {"type": "json", "value": {"properties": {"a": {"type": "string"}}}}),
        ("grammar", {"type": "regex", "value": "[a-z]+"}),
        ("adapter_id", "my-lora"),
    ],
)
def test_unimplemented_fields_set_are_refused_by_name(client, field, value):
    response = post(client, {"max_new_tokens": 2, field: value})
    assert response.status_code == 422
    body = response.get_json()
    assert body["error_type"] == "validation"
    assert body["error"].startswith(f"parameters.{field}: not supported by this server")


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"top_n_tokens": 6}, "parameters.top_n_tokens"),  # TGI's default cap, 5
        ({"top_n_tokens": -1}, "parameters.top_n_tokens"),
        ({"typical_p": 0}, "parameters.typical_p"),
        ({"typical_p": 1.5}, "parameters.typical_p"),
        ({"typical_p": "0.5"}, "parameters.typical_p"),  # still strict types
        ({"best_of": 0}, "parameters.best_of"),
        ({"frequency_penalty": 3}, "parameters.frequency_penalty"),
        ({"decoder_input_details": 1}, "parameters.decoder_input_details"),
        ({"max_new_tokens": 100_000}, "parameters.max_new_tokens"),  # the cap stays
        ({"typo_field": None}, "parameters.typo_field"),  # unknown fields are still refused
    ],
)
def test_bad_values_of_the_new_fields_are_refused_by_name(client, parameters, named):
    response = post(client, parameters)
    assert response.status_code == 422
    assert named in response.get_json()["error"]


def test_nan_typical_p_is_refused(client):
    body = b'{"inputs": "hi", "parameters": {"typical_p": NaN}}'
    response = client.post("/invocations", data=body, content_type="application/json")
    assert response.status_code == 422
    assert "parameters.typical_p" in response.get_json()["error"]


def test_decoder_input_details_cannot_stream(client):
    response = post(client, {"decoder_input_details": True}, stream=True)
    assert response.status_code == 422
    assert "parameters.decoder_input_details" in response.get_json()["error"]


# ----- typical_p -----


def test_typical_filter_matches_transformers_typical_warper():
    from transformers.generation.logits_process import TypicalLogitsWarper

    generator = torch.Generator().manual_seed(0)
    for mass in (0.2, 0.5, 0.9, 0.99):
        logits = torch.randn(4, 64, generator=generator) * 3
        expected = TypicalLogitsWarper(mass=mass)(None, logits.clone())
        assert torch.equal(typical_filter(logits, mass).isinf(), expected.isinf())
        assert typical_filter(logits, mass).isfinite().sum(-1).min() >= 1


def test_typical_p_keeps_the_typical_tokens_not_the_most_likely():
    """One likely token (p = 0.3) among a thousand unlikely ones: its surprisal is far from the entropy, theirs is
    close, so the typical set is the unlikely ones. Sampling with a small typical_p never picks the likely token;
    without typical_p it picks it about 30% of the time."""
    row = torch.zeros(1000)
    row[7] = math.log(0.3 / 0.7 * 999)
    typical = NextTokenChooser(SamplingParams(max_new_tokens=1, do_sample=True, seed=1, typical_p=0.2), [], "cpu")
    plain = NextTokenChooser(SamplingParams(max_new_tokens=1, do_sample=True, seed=1), [], "cpu")
    picked_typical = [typical.choose(row)[0] for _ in range(200)]
    picked_plain = [plain.choose(row)[0] for _ in range(200)]
    assert 7 not in picked_typical and len(set(picked_typical)) > 50
    assert 30 < picked_plain.count(7) < 90


def test_typical_p_samples_like_tgi_even_with_do_sample_false(client):
    """TGI's rule: a sampling knob set samples (the `text-generation` client always sends do_sample false)."""
    reply = ok(client, do_sample=False, typical_p=0.5, seed=3, max_new_tokens=6, details=True)
    assert reply["details"]["seed"] == 3
    assert reply == ok(client, do_sample=False, typical_p=0.5, seed=3, max_new_tokens=6, details=True)
    greedy = ok(client, max_new_tokens=6, details=True)
    assert greedy["details"]["seed"] is None


# ----- top_n_tokens -----


def test_top_n_tokens_are_best_first_and_the_greedy_choice_is_the_first(client):
    reply = ok(client, max_new_tokens=6, details=True, top_n_tokens=3)
    details = reply["details"]
    assert len(details["top_tokens"]) == len(details["tokens"]) == details["generated_tokens"]
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert set(top[0]) == {"id", "text", "logprob", "special"}
        assert top[0]["id"] == token["id"]
        assert top[0]["logprob"] == pytest.approx(token["logprob"], abs=1e-5)
    assert "top_tokens" not in ok(client, max_new_tokens=2, details=True)["details"]


def test_top_n_tokens_do_not_change_the_answer(client):
    plain = ok(client, max_new_tokens=8)["generated_text"]
    assert ok(client, max_new_tokens=8, top_n_tokens=5)["generated_text"] == plain


def test_choose_next_tokens_computes_alternatives_only_for_rows_that_ask():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    choosers = [
        NextTokenChooser(SamplingParams(max_new_tokens=1), [], "cpu"),
        NextTokenChooser(SamplingParams(max_new_tokens=1, top_n_tokens=4), [], "cpu"),
        NextTokenChooser(SamplingParams(max_new_tokens=1, do_sample=True, seed=0, top_n_tokens=2), [], "cpu"),
    ]
    plain, asking, sampled = choose_next_tokens(choosers, logits)
    assert plain[2] == [] and plain[0] == int(logits[0].argmax())
    expected = torch.log_softmax(logits[1], -1).topk(4)
    assert [token_id for token_id, _ in asking[2]] == expected.indices.tolist()
    assert asking[2][0][0] == asking[0]
    # A sampled row's alternatives are of the raw logits, whatever it sampled.
    assert [token_id for token_id, _ in sampled[2]] == logits[2].topk(2).indices.tolist()


# ----- decoder_input_details -----


def test_prefill_logprobs_match_a_direct_forward_pass(client, predictor):
    text = "Hello there, tiny model."
    reply = post(
        client, {"max_new_tokens": 2, "decoder_input_details": True, "apply_chat_template": False}, inputs=text
    )
    details = reply.get_json()[0]["details"]  # details without asking: TGI's decoder_input_details implies them
    prefill = details["prefill"]
    ids = predictor.encode_raw(text)
    assert [t["id"] for t in prefill] == ids
    assert all(set(t) == {"id", "text", "logprob"} for t in prefill)
    assert prefill[0]["logprob"] is None
    assert "".join(t["text"] for t in prefill) == text
    model = reference_model(predictor)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    # llama.cpp's kernels sum in another order than PyTorch's: the same f32 weights, logits within 1e-3.
    tolerance = 1e-4 if predictor.engine.runner.name == "transformers" else 1e-3
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(expected.tolist(), abs=tolerance)
    assert all(math.isfinite(t["logprob"]) for t in prefill[1:])
    assert ok(client, max_new_tokens=2, details=True)["details"]["prefill"] == []


def test_a_scored_prompt_is_prefilled_alone_and_only_it_pays_for_every_position(tiny_model_dir):
    """Three requests queued together: the two plain ones share one prefill that keeps only the last position's
    logits; the scored one gets a prefill of its own with every position's. Answers are unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    calls: list[tuple[int, int | None]] = []
    forward = model.forward

    def recording(*args, **kwargs):
        if "logits_to_keep" in kwargs:  # prefills only
            calls.append((kwargs["input_ids"].shape[0], kwargs["logits_to_keep"]))
        return forward(*args, **kwargs)

    model.forward = recording
    engine = Engine(model, tokenizer, eos_token_ids=[], context_length=256, max_batch_size=4, max_queue=8)
    prompts = [tokenizer(text).input_ids for text in ("first prompt", "second, scored", "third prompt")]
    scored = [False, True, False]
    handles = [
        engine.submit(ids, SamplingParams(max_new_tokens=3, prefill_logprobs=s), deadline=1e12)
        for ids, s in zip(prompts, scored, strict=True)
    ]
    engine.start()
    try:
        results = [handle.result(60) for handle in handles]
    finally:
        engine.stop()
    assert calls == [(1, 1), (1, 0), (1, 1)]  # (rows, logits_to_keep): the first, the scored one, the third
    assert [len(r.prefill) for r in results] == [0, len(prompts[1]), 0]
    assert results[1].prefill[0].logprob is None


# ----- stream frames -----


def test_stream_frames_have_tgi_fields_in_tgi_order(client):
    response = post(client, {"max_new_tokens": 5, "top_n_tokens": 2, "details": True}, stream=True)
    assert response.status_code == 200
    frames = sse_frames(response)
    assert [frame["index"] for frame in frames] == [1, 2, 3, 4, 5]
    for frame in frames:
        assert list(frame) == ["index", "token", "top_tokens", "generated_text", "details"]
        assert set(frame["token"]) == {"id", "text", "logprob", "special"}
        assert len(frame["top_tokens"]) == 2 and frame["top_tokens"][0]["id"] == frame["token"]["id"]
    assert all(frame["generated_text"] is None and frame["details"] is None for frame in frames[:-1])
    last = frames[-1]
    assert last["generated_text"] == ok(client, max_new_tokens=5)["generated_text"]
    assert set(last["details"]) == {"finish_reason", "generated_tokens", "seed", "input_length"}
    plain = sse_frames(post(client, {"max_new_tokens": 2}, stream=True))
    assert all(list(frame) == ["index", "token", "generated_text", "details"] for frame in plain)
    assert plain[-1]["details"] is None  # StreamDetails only when asked for, as TGI


def test_non_stream_details_have_tgi_fields(client):
    details = ok(client, max_new_tokens=3, details=True, top_n_tokens=1)["details"]
    tgi = ["finish_reason", "generated_tokens", "seed", "prefill", "tokens", "top_tokens"]
    assert list(details) == [*tgi, "input_length"]  # input_length: ours, beyond TGI's Details
