"""The engine's batching against plain `generate`, and the artifact rules (LoRA, safetensors only)."""

from __future__ import annotations

import json
import time

import pytest
from serve.artifact import ArtifactError, load_artifact
from serve.engine import Engine
from serve.generation import SamplingParams


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_requests_joining_and_leaving_the_batch_match_single_generate(model_and_tokenizer):
    """Staggered arrivals, different prompt and output lengths: every greedy answer equals `generate`'s."""
    import torch

    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, eos_token_ids=[], context_length=1024, max_batch_size=4, max_queue=16)
    engine.start()
    try:
        prompts = [tokenizer(f"question {'x' * (3 * i)} number {i}").input_ids for i in range(10)]
        lengths = [5 + 3 * (i % 4) for i in range(10)]
        handles = []
        for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
            handles.append(engine.submit(prompt, SamplingParams(max_new_tokens=n), deadline=time.monotonic() + 60))
            if i % 3 == 0:
                time.sleep(0.02)
        results = [h.result(timeout=60) for h in handles]
    finally:
        engine.stop()
    for prompt, n, result in zip(prompts, lengths, results, strict=True):
        with torch.inference_mode():
            reference = model.generate(
                torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert [t.id for t in result.tokens] == reference
        assert result.finish_reason == "length"


def test_eos_list_stops_on_any_member(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, eos_token_ids=[], context_length=1024)
    engine.start()
    prompt = tokenizer("hello").input_ids
    free = engine.submit(prompt, SamplingParams(max_new_tokens=6), deadline=time.monotonic() + 60).result(60)
    engine.stop()
    third = free.tokens[2].id
    engine = Engine(model, tokenizer, eos_token_ids=[10**6, third], context_length=1024)
    engine.start()
    stopped = engine.submit(prompt, SamplingParams(max_new_tokens=6), deadline=time.monotonic() + 60).result(60)
    engine.stop()
    assert stopped.finish_reason == "eos_token"
    assert stopped.tokens[-1].id == third and stopped.generated_tokens <= 3


def test_a_request_past_its_deadline_in_the_queue_gets_an_error_not_an_empty_answer(model_and_tokenizer):
    """It never started: an empty 200 would read as the model's answer (issue 20, item 4)."""
    from serve.generation import QueueTimeout

    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, eos_token_ids=[], context_length=1024)
    engine.start()
    handle = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=5), deadline=time.monotonic() - 1)
    with pytest.raises(QueueTimeout, match="in the queue without starting"):
        handle.result(10)
    engine.stop()


def test_lora_adapter_artifact_loads_merged(tiny_model_dir, tmp_path, make_config_for):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)  # safetensors; base_model_name_or_path = tiny_model_dir
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    merged_reference = peft_model.merge_and_unload()

    loaded = load_artifact(adapter_dir, make_config_for(adapter_dir))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.allclose(loaded.model(ids).logits, merged_reference(ids).logits, atol=1e-5)
    assert loaded.tokenizer.chat_template  # taken from the base model when the adapter has none


def test_pickle_weights_are_refused(tmp_path, make_config_for):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ArtifactError, match="safetensors only"):
        load_artifact(tmp_path, make_config_for(tmp_path))


def test_missing_model_dir_names_the_setting(tmp_path, make_config_for):
    with pytest.raises(ArtifactError, match="SAGEMAKER_BASE_DIR"):
        load_artifact(tmp_path / "nope", make_config_for(tmp_path / "nope"))


@pytest.mark.parametrize("setting", ["auto", "packed", "stock"])
def test_cpu_matmul_setting_packs_linears_and_keeps_the_logits(tiny_model_dir, make_config_for, setting):
    """oneDNN-packed linears (SERVE_CPU_MATMUL) give the stock kernels' logits, for one row and for many."""
    import torch
    from serve.cpu_kernels import PackedLinear
    from transformers import AutoModelForCausalLM

    loaded = load_artifact(tiny_model_dir, make_config_for(tiny_model_dir, cpu_matmul=setting))
    packed = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
    assert bool(packed) == (setting != "stock")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (
        loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight
        or not reference.config.tie_word_embeddings
    )  # packing keeps tied weights tied
    with torch.inference_mode():
        for batch, length in [(1, 1), (1, 9), (4, 1), (3, 7)]:
            ids = torch.randint(0, reference.config.vocab_size, (batch, length))
            torch.testing.assert_close(
                loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize(
    ("manifest", "config", "cuda", "cpu"),
    [
        ({"dtype": "bfloat16"}, {"torch_dtype": "float32"}, "bfloat16", "float32"),  # the manifest wins
        ({"dtype": "float16"}, None, "float16", "float32"),
        (None, {"dtype": "bfloat16"}, "bfloat16", "float32"),  # a plain Transformers directory
        ({"dtype": "float32"}, None, "bfloat16", "float32"),  # fp32 on a GPU: its bf16 fast path, as before
        (None, None, "bfloat16", "float32"),
    ],
)
def test_auto_dtype_is_the_artifacts_16_bit_type_on_gpu_and_fp32_on_cpu(tmp_path, manifest, config, cuda, cpu):
    import torch
    from serve.artifact import _dtype

    for name, content in (("manifest.json", manifest), ("config.json", config)):
        if content is not None:
            (tmp_path / name).write_text(json.dumps(content))
    assert _dtype("auto", "cuda", tmp_path) == getattr(torch, cuda)
    assert _dtype("auto", "cpu", tmp_path) == getattr(torch, cpu)
    assert _dtype("float16", "cpu", tmp_path) == torch.float16  # SERVE_DTYPE set: as told


def test_weights_that_differ_from_the_manifest_s_hashes_are_refused(tiny_model_dir, tmp_path, make_config_for):
    """Issue 20, item 7: training records each weight file's sha256; the server checks them before loading."""
    import hashlib
    import shutil

    artifact = tmp_path / "model"
    shutil.copytree(tiny_model_dir, artifact)
    weights = artifact / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (artifact / "manifest.json").write_text(json.dumps({"weights_sha256": {"model.safetensors": digest}}))
    assert load_artifact(artifact, make_config_for(artifact)).model is not None  # as written: loads

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        load_artifact(artifact, make_config_for(artifact))

    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))  # restored
    (artifact / "extra.safetensors").write_bytes(b"planted")
    with pytest.raises(ArtifactError, match=r"not listed: \['extra.safetensors'\]"):
        load_artifact(artifact, make_config_for(artifact))
