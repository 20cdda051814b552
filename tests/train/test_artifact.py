"""The artifact's manifest.json, written by trainer.artifact.save_artifact without training."""

from __future__ import annotations

import hashlib
import json

from trainer.artifact import save_artifact


def test_the_manifest_records_the_sha256_of_every_weight_file(tmp_path, tiny_model_dir):
    """The server checks each weight file against this before it loads it (issue 20, item 7)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    given = {"format_version": 1, "method": "lora"}
    model_dir = save_artifact(model, tokenizer, [tokenizer.eos_token_id], tmp_path / "model", given)

    manifest = json.loads((model_dir / "manifest.json").read_text())
    weights = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert weights == ["model.safetensors"]
    assert manifest["weights_sha256"] == {
        name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest() for name in weights
    }
    assert manifest["method"] == "lora" and "weights_sha256" not in given  # the caller's dict is left alone
