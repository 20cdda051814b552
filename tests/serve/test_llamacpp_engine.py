"""The llama.cpp engine (serve.llamacpp): the same logits as the transformers model from an f32 GGUF, sequences
batched in one llama.cpp context, the engine choice (SERVE_ENGINE), and the errors of a bad or missing GGUF.

The HTTP contract itself is tested on both engines by the parametrised `predictor` fixture (conftest.py)."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from serve import llamacpp
from serve.artifact import ArtifactError, load_artifact
from serve.engine import Engine
from serve.engine_choice import gguf_entry
from serve.generation import GenerationError, SamplingParams
from serve.runners import TransformersRunner
from transformers import AutoTokenizer

from .conftest import make_config


@pytest.fixture(scope="module")
def reference(tiny_gguf_model_dir):
    return load_artifact(tiny_gguf_model_dir, make_config(tiny_gguf_model_dir, engine="transformers"))


def _runner(model_dir, **kwargs):
    entry = gguf_entry(model_dir)
    options = {"threads": 1, "max_sequences": 4, "kv_tokens": 512, **kwargs}
    return llamacpp.LlamaCppRunner(entry.path, **options)


def test_prefill_and_decode_logits_match_the_transformers_model(tiny_gguf_model_dir, reference):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    ours = _runner(tiny_gguf_model_dir)
    theirs = TransformersRunner(reference.model, pad_id=0)
    try:
        assert torch.allclose(ours.prefill(prompts).last, theirs.prefill(prompts).last, atol=1e-3)
        for step in range(4):  # both rows decode together, each at its own position
            tokens, positions = [20 + step, 30 + step], [5 + step, 3 + step]
            assert torch.allclose(ours.decode(tokens, positions), theirs.decode(tokens, positions), atol=1e-3)
        ours.keep([1])  # the first sequence leaves; the second goes on from its own cache
        theirs.keep([1])
        assert torch.allclose(ours.decode([40], [7]), theirs.decode([40], [7]), atol=1e-3)
    finally:
        ours.close()


def test_every_position_logits_for_scoring_a_prompt(tiny_gguf_model_dir, reference):
    prompt = [5, 6, 7, 8, 9, 10]
    runner = _runner(tiny_gguf_model_dir)
    try:
        out = runner.prefill([prompt], every_position=True)
    finally:
        runner.close()
    expected = reference.model(input_ids=torch.tensor([prompt])).logits[0]
    assert out.every_position.shape == expected.shape
    assert torch.allclose(out.every_position, expected, atol=1e-3)
    assert torch.allclose(out.last[0], expected[-1], atol=1e-3)


def test_slots_are_reused_after_sequences_leave(tiny_gguf_model_dir):
    runner = _runner(tiny_gguf_model_dir, max_sequences=2)
    try:
        first = runner.prefill([[5, 6, 7]]).last
        runner.prefill([[8, 9]])
        with pytest.raises(llamacpp.LlamaCppError, match="free sequence slots"):
            runner.prefill([[1, 2]])
        runner.keep([])  # both leave: their slots and cache cells are free again
        assert torch.allclose(runner.prefill([[5, 6, 7]]).last, first, atol=1e-3)  # nothing left of the others
    finally:
        runner.close()


def test_a_full_kv_cache_retires_the_newest_request_as_out_of_memory(tiny_gguf_model_dir):
    """llama.cpp allocates its KV cache up front; a step with no room left is what running out of memory is on
    the transformers engine: the newest sequence gets the error and the others go on."""
    runner = _runner(tiny_gguf_model_dir, kv_tokens=256)
    engine = Engine(
        runner,
        AutoTokenizer.from_pretrained(tiny_gguf_model_dir),
        eos_token_ids=[],
        context_length=1024,
        max_batch_total_tokens=10_000,  # the engine's own bound would wait; llama.cpp's cache is the limit here
    )
    deadline = time.monotonic() + 60
    first = engine.submit(list(range(5, 105)), SamplingParams(max_new_tokens=40), deadline=deadline)
    second = engine.submit(list(range(5, 105)), SamplingParams(max_new_tokens=40), deadline=deadline)
    engine.start()
    try:
        assert first.result(60).generated_tokens == 40
        with pytest.raises(GenerationError, match="out of memory"):
            second.result(60)
    finally:
        engine.stop()
        runner.close()


def _config(make_config_for, model_dir, engine):
    return make_config_for(model_dir, engine=engine)


def test_auto_picks_llamacpp_on_a_cpu_when_the_artifact_has_a_gguf(
    tiny_model_dir, tiny_gguf_model_dir, make_config_for
):
    assert not torch.cuda.is_available()
    loader = llamacpp.choose_loader(_config(make_config_for, tiny_gguf_model_dir, "auto"))
    assert loader.func is llamacpp.load_gguf_artifact
    assert llamacpp.choose_loader(_config(make_config_for, tiny_model_dir, "auto")) is load_artifact
    assert llamacpp.choose_loader(_config(make_config_for, tiny_gguf_model_dir, "transformers")) is load_artifact


def test_llamacpp_without_a_gguf_is_a_clear_load_error(tiny_model_dir, make_config_for):
    with pytest.raises(ArtifactError, match=r"SERVE_ENGINE=llamacpp, but the artifact has no GGUF"):
        llamacpp.choose_loader(_config(make_config_for, tiny_model_dir, "llamacpp"))


def test_a_changed_gguf_is_refused(tiny_gguf_model_dir, tmp_path, make_config_for):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_gguf_model_dir, model_dir)
    gguf = gguf_entry(model_dir).path
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match=r"sha256 differs from manifest\.json's; the GGUF was changed"):
        llamacpp.choose_loader(_config(make_config_for, model_dir, "llamacpp"))(
            model_dir, _config(make_config_for, model_dir, "llamacpp")
        )
    manifest = json.loads((model_dir / "manifest.json").read_text())
    gguf.unlink()
    with pytest.raises(ArtifactError, match=f"names the GGUF {manifest['gguf']['file']}, which the artifact lacks"):
        llamacpp.load_gguf_artifact(
            model_dir, _config(make_config_for, model_dir, "llamacpp"), entry=gguf_entry(model_dir)
        )


def test_the_loaded_llamacpp_artifact_reads_the_same_settings(tiny_gguf_model_dir, reference, make_config_for):
    loaded = llamacpp.load_gguf_artifact(
        tiny_gguf_model_dir,
        _config(make_config_for, tiny_gguf_model_dir, "llamacpp"),
        entry=gguf_entry(tiny_gguf_model_dir),
    )
    try:
        assert loaded.eos_token_ids == reference.eos_token_ids
        assert loaded.context_length == reference.context_length
        assert loaded.name.endswith("[GGUF f32]")
        assert loaded.max_batch_total_tokens == loaded.model.kv_tokens
    finally:
        loaded.model.close()


def test_the_choice_is_made_without_torch_for_the_launcher(tiny_model_dir, tiny_gguf_model_dir, monkeypatch):
    """containers/serve/serve decides the OpenMP wait policy from the same choice before any worker starts."""
    from serve import engine_choice

    assert engine_choice.choose("auto", tiny_gguf_model_dir, gpu=False).engine == "llamacpp"
    assert engine_choice.choose("auto", tiny_gguf_model_dir, gpu=True).engine == "transformers"  # GPUs: built-in
    assert engine_choice.choose("auto", tiny_model_dir, gpu=False).why == "auto: the artifact has no GGUF"
    monkeypatch.setattr(engine_choice, "llamacpp_installed", lambda: False)
    choice = engine_choice.choose("auto", tiny_gguf_model_dir, gpu=False)
    assert choice.engine == "transformers" and "llama-cpp-python is not installed" in choice.why
    with pytest.raises(engine_choice.EngineUnavailable, match="llama-cpp-python is not installed here"):
        engine_choice.choose("llamacpp", tiny_gguf_model_dir, gpu=False)
