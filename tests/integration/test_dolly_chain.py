"""The reference project's own model family, end to end on a tiny stand-in: a GPT-NeoX whose tokenizer is shaped
like databricks/dolly-v2's (no chat template; `### Instruction:` / `### Response:` / `### End` as added special
tokens; `<|endoftext|>` as EOS; `<|padding|>` in the vocabulary). Through the real entry points: the training
image's `train` (LoRA and full fine-tuning) -> the artifact -> the serving app -> `{"inputs": ...}`."""

from __future__ import annotations

import json

import pytest
from train.conftest import csv_text, faq_rows, make_job, run_train, tiny_hyperparameters

pytestmark = pytest.mark.slow

TEMPLATE_TEXT = ("### Instruction", "### Response", "### End", "Below is an instruction")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_dolly_model_trains_packages_and_serves(tmp_path, tiny_dolly_model_dir, method):
    from serve import create_app
    from serve.config import ServeConfig
    from serve.predictor import Predictor
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    rows = csv_text(faq_rows(12), header=["question", "answer"])
    job = make_job(tmp_path, tiny_hyperparameters(tiny_dolly_model_dir, method=method), {"train/faq.csv": rows})
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    model_dir = job / "model"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["prompt_format"] == "dolly" and manifest["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_vocab = AutoConfig.from_pretrained(tiny_dolly_model_dir).vocab_size
    assert AutoConfig.from_pretrained(model_dir).vocab_size == base_vocab  # `<|padding|>` reused: no resize
    assert tokenizer.pad_token == "<|padding|>" and tokenizer.eos_token == "<|endoftext|>"
    end_id = tokenizer.convert_tokens_to_ids("### End")
    assert end_id in GenerationConfig.from_pretrained(model_dir).eos_token_id  # one token here: a stop token
    # The Dolly format travels in the artifact's chat template: the server needs no code from training.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("### Instruction:\nQ?\n\n### Response:\n")

    config = ServeConfig(model_dir=model_dir, max_batch_size=4, default_max_new_tokens=24, torch_threads=1)
    predictor = Predictor(config)
    predictor.load_now()
    assert predictor.ready, predictor.reason
    try:
        client = create_app(config, predictor=predictor).test_client()
        reply = client.post(
            "/invocations", json={"inputs": "What is Amazon SageMaker?", "parameters": {"details": True}}
        )
        assert reply.status_code == 200, reply.get_data(as_text=True)
        [answer] = reply.get_json()
        assert answer["details"]["generated_tokens"] >= 1
        assert not any(marker in answer["generated_text"] for marker in TEMPLATE_TEXT), answer["generated_text"]
    finally:
        predictor.engine.stop()
