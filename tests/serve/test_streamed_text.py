"""Streamed text: incremental detokenization (TGI's offsets), held-back UTF-8 and stop strings.

Multi-byte characters (accents, an emoji, CJK) arrive one byte-level token at a time, or in tokens that hold
one character and the start of the next. Whatever the split, the streamed deltas must join to exactly the
final text, no delta may hold half a character, and no part of a stop string may reach a stream.
"""

from __future__ import annotations

import json
import time

import pytest
from serve import create_app
from serve.detokenizer import IncrementalDetokenizer
from serve.generation import EOS, LENGTH, STOP, TIMEOUT, Finished, SamplingParams, Token
from serve.stopping import StoppingCriteria

TEXT = "héllo 😀 wörld 你好!"
PROMPT = "hi"


def byte_tokenizer(merges: tuple[tuple[str, str], ...] = ()):
    """The tiny model's byte-level tokenizer (one token per byte), plus `merges`: tokens spanning bytes."""
    from fixtures.tiny_model import SPECIAL_TOKENS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    return tokenizer


# " " + the emoji's first byte, "w" + the first byte of "ö": tokens that end one character and start the next.
SPANNING = (("Ġ", "ð"), ("w", "Ã"))


@pytest.fixture(scope="module", params=["bytes", "spanning"])
def tokenizer(request):
    return byte_tokenizer(SPANNING if request.param == "spanning" else ())


# ----- the detokenizer -----


def test_pieces_join_to_the_whole_decode_and_never_hold_half_a_character(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in ids]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) + detokenizer.flush() == TEXT == tokenizer.decode(ids)


def test_a_character_shows_when_its_last_byte_arrives():
    tokenizer = byte_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    emoji = tokenizer("😀", add_special_tokens=False).input_ids
    assert len(emoji) == 4
    assert [detokenizer.push(i) for i in emoji] == ["", "", "", "😀"]


def test_flush_gives_an_unfinished_character_as_decoding_does():
    tokenizer = byte_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    ids = tokenizer("a你", add_special_tokens=False).input_ids[:-1]  # "a" and 2 of the 3 bytes of 你
    assert [detokenizer.push(i) for i in ids] == ["a", "", ""]
    assert detokenizer.flush() == tokenizer.decode(ids)[1:] == "\ufffd"
    assert detokenizer.flush() == ""


def test_special_tokens_add_no_text():
    tokenizer = byte_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    ids = [*tokenizer("ok", add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    assert [detokenizer.push(i) for i in ids] == ["o", "k", ""]


# ----- stopping -----


def criteria(*stop: str, max_new_tokens: int = 100, room: int = 100, deadline: float = float("inf")):
    return StoppingCriteria(
        eos_token_ids={7}, max_new_tokens=max_new_tokens, context_room=room, deadline=deadline, stop=stop
    )


def test_a_stop_string_split_across_pieces_never_shows():
    stopping = criteria("END")
    assert stopping.release("abcE", final=False) == ("abc", False)
    assert stopping.release("N", final=False) == ("", False)
    assert stopping.release("Dxyz", final=False) == ("", True)


def test_a_near_miss_is_released_once_the_next_text_settles_it():
    stopping = criteria("END")
    assert stopping.release("abEN", final=False) == ("ab", False)
    assert stopping.release("x", final=False) == ("ENx", False)


def test_the_end_of_a_sequence_releases_what_was_held():
    stopping = criteria("END")
    assert stopping.release("abE", final=False) == ("ab", False)
    assert stopping.release("", final=True) == ("E", False)


def test_stop_strings_are_tried_in_the_callers_order():
    assert criteria("b", "ab").release("xab", final=False) == ("xa", True)
    assert criteria("ab", "b").release("xab", final=False) == ("x", True)


def test_limits_eos_then_length_then_timeout():
    assert criteria().limit(7, 1, now=0) == EOS
    assert criteria(max_new_tokens=3).limit(7, 3, now=0) == EOS
    assert criteria(max_new_tokens=3).limit(1, 3, now=0) == LENGTH
    assert criteria(room=2).limit(1, 2, now=0) == LENGTH  # the context is full
    assert criteria(deadline=5).limit(1, 1, now=5) == TIMEOUT
    assert criteria(deadline=5).limit(1, 1, now=4, deadline_cap=3) == TIMEOUT  # shutdown drain
    assert criteria(deadline=5).limit(1, 1, now=4) is None


# ----- the engine and the HTTP streams, on a model that says TEXT -----


class ScriptedModel:
    """A real tiny model whose logits are replaced: each sequence generates `script`, then the end token.

    The k-th token of a sequence is read from its position (prompt_length - 1 + k), so every sequence in a
    batch follows the script whatever step it joined at.
    """

    def __init__(self, model, script: list[int], eos_id: int, vocab_size: int, prompt_length: int = 0):
        self._model, self.script, self.eos_id, self.vocab_size = model, script, eos_id, vocab_size
        self.prompt_length = prompt_length

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *, input_ids, position_ids, **kwargs):
        import torch

        out = self._model(input_ids=input_ids % self._model.config.vocab_size, position_ids=position_ids, **kwargs)
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab_size)
        for row, k in enumerate((position_ids[:, -1] - (self.prompt_length - 1)).tolist()):
            logits[row, 0, self.script[k] if 0 <= k < len(self.script) else self.eos_id] = 10.0
        out.logits = logits
        return out


def streamed(handle, *, whole_characters: bool = True) -> tuple[str, Finished]:
    """(the deltas joined, the result), checking that no delta holds half a character."""
    deltas = []
    for event in handle.events(60):
        token = event if isinstance(event, Token) else event.last_token
        if token is not None:
            assert not whole_characters or "\ufffd" not in token.delta
            deltas.append(token.delta)
    assert isinstance(event, Finished)
    return "".join(deltas), event


# Stop strings that begin, end or lie inside multi-byte characters' tokens, that span several tokens,
# that appear nowhere, or that only nearly appear (their start does, so it is held back, then released).
STOPS = ["😀 w", "wö", "ö", "你好!", "好", "!", "llo 😀", " 😀", "é", "xyz", "😀 x", "你x", "wo"]


def test_engine_streams_join_to_the_result_and_stop_strings_never_leak(tiny_model_dir, tokenizer):
    from serve.engine import Engine
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    script = tokenizer(TEXT, add_special_tokens=False).input_ids
    scripted = ScriptedModel(model, script, tokenizer.eos_token_id, len(tokenizer), prompt_length=len(prompt))
    engine = Engine(
        scripted, tokenizer, eos_token_ids=[tokenizer.eos_token_id], context_length=1024, max_batch_size=8, max_queue=64
    )
    engine.start()
    try:
        deadline = time.monotonic() + 60
        handles = {stop: engine.submit(prompt, SamplingParams(100, stop=(stop,)), deadline=deadline) for stop in STOPS}
        plain = engine.submit(prompt, SamplingParams(100), deadline=deadline)
        cut = engine.submit(prompt, SamplingParams(len(script) - 2), deadline=deadline)  # ends inside 好's bytes
        outcomes = {stop: streamed(handle) for stop, handle in handles.items()}
        plain_text, plain_result = streamed(plain)
        cut_text, cut_result = streamed(cut, whole_characters=False)
    finally:
        engine.stop()
    for stop, (text, result) in outcomes.items():
        expected = TEXT[: TEXT.find(stop)] if stop in TEXT else TEXT
        assert (text, result.text) == (expected, expected), stop
        assert result.finish_reason == (STOP if stop in TEXT else EOS), stop
    assert plain_text == plain_result.text == TEXT
    assert plain_result.finish_reason == EOS and plain_result.tokens[-1].special
    # Cut short inside a character: the result says what decoding says, and so does the stream.
    expected = tokenizer.decode(script[:-2])
    assert cut_result.finish_reason == LENGTH
    assert cut_text == cut_result.text == expected and expected.endswith("\ufffd")


def _sse(response) -> list:
    frames = []
    for block in b"".join(response.response).decode().strip().split("\n\n"):
        data = block.removeprefix("data: ")
        frames.append(data if data == "[DONE]" else json.loads(data))
    return frames


@pytest.fixture(scope="module")
def scripted_client(tiny_model_dir):
    """The app around a predictor whose model answers TEXT to any prompt (`prompt_length` set per request)."""
    from serve.artifact import load_artifact
    from serve.config import ServeConfig
    from serve.predictor import Predictor

    def loader(model_dir, config):
        loaded = load_artifact(model_dir, config)
        tokenizer = loaded.tokenizer
        script = tokenizer(TEXT, add_special_tokens=False).input_ids
        loaded.model = ScriptedModel(loaded.model, script, tokenizer.eos_token_id, len(tokenizer))
        return loaded

    predictor = Predictor(ServeConfig(model_dir=tiny_model_dir, max_batch_size=8, torch_threads=1), loader=loader)
    predictor.load_now()
    assert predictor.ready, predictor.reason
    yield create_app(predictor.config, predictor=predictor).test_client(), predictor
    predictor.engine.stop()


@pytest.mark.parametrize("stop", [None, "😀 w", "wö", "好!"])
def test_tgi_stream_token_texts_join_to_the_generated_text(scripted_client, stop):
    client, predictor = scripted_client
    predictor.loaded.model.prompt_length = len(predictor.encode_raw(PROMPT))
    parameters = {"apply_chat_template": False, "max_new_tokens": 100, "stop": [stop] if stop else []}
    expected = TEXT[: TEXT.find(stop)] if stop else TEXT
    reply = client.post("/invocations", json={"inputs": PROMPT, "parameters": parameters}).get_json()
    assert reply[0]["generated_text"] == expected
    streamed = {"inputs": PROMPT, "parameters": {**parameters, "details": True}, "stream": True}
    frames = _sse(client.post("/invocations", json=streamed))
    texts = [frame["token"]["text"] for frame in frames if not frame["token"]["special"]]
    assert not any("\ufffd" in text for text in texts)
    assert "".join(texts) == frames[-1]["generated_text"] == expected
    assert frames[-1]["details"]["finish_reason"] == ("stop_sequence" if stop else "eos_token")


@pytest.mark.parametrize("stop", [None, "😀 w", "wö", "好!"])
def test_chat_stream_deltas_join_to_the_message(scripted_client, stop):
    client, predictor = scripted_client
    messages = [{"role": "user", "content": PROMPT}]
    predictor.loaded.model.prompt_length = len(predictor.encode_chat(messages, field="messages"))
    request = {"messages": messages, "max_tokens": 100, "temperature": 0, **({"stop": stop} if stop else {})}
    expected = TEXT[: TEXT.find(stop)] if stop else TEXT
    reply = client.post("/invocations", json=request).get_json()
    assert reply["choices"][0]["message"]["content"] == expected
    frames = _sse(client.post("/invocations", json={**request, "stream": True}))
    assert frames[-1] == "[DONE]"
    deltas = [frame["choices"][0]["delta"].get("content", "") for frame in frames[:-1]]
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == expected
    assert frames[-2]["choices"][0]["finish_reason"] == "stop"


def test_the_artifacts_own_stop_strings_end_every_answer(tiny_model_dir, tmp_path):
    """A several-token end marker (Dolly's `### End` in a vocabulary without it) travels in the artifact's
    generation_config.json as `stop_strings`; the server ends every answer there, whatever the request says."""
    import shutil

    from serve.artifact import load_artifact
    from serve.config import ServeConfig
    from serve.predictor import Predictor
    from transformers import GenerationConfig

    artifact = tmp_path / "model"
    shutil.copytree(tiny_model_dir, artifact)
    generation = GenerationConfig.from_pretrained(artifact)
    generation.stop_strings = ["wö"]
    generation.save_pretrained(artifact)

    def loader(model_dir, config):
        loaded = load_artifact(model_dir, config)
        script = loaded.tokenizer(TEXT, add_special_tokens=False).input_ids
        loaded.model = ScriptedModel(loaded.model, script, loaded.tokenizer.eos_token_id, len(loaded.tokenizer))
        return loaded

    predictor = Predictor(ServeConfig(model_dir=artifact, max_batch_size=8, torch_threads=1), loader=loader)
    predictor.load_now()
    assert predictor.ready, predictor.reason
    try:
        assert predictor.loaded.stop_strings == ("wö",)
        predictor.loaded.model.prompt_length = len(predictor.encode_raw(PROMPT))
        client = create_app(predictor.config, predictor=predictor).test_client()
        for stop in ([], ["😀"]):  # the request's own stop strings still apply, the artifact's too
            parameters = {"apply_chat_template": False, "max_new_tokens": 100, "stop": stop, "details": True}
            [reply] = client.post("/invocations", json={"inputs": PROMPT, "parameters": parameters}).get_json()
            assert reply["generated_text"] == TEXT[: TEXT.find(stop[0] if stop else "wö")]
            assert reply["details"]["finish_reason"] == "stop_sequence"
    finally:
        predictor.engine.stop()
