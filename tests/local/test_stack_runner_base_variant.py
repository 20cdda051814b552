"""`make demo DEMO_ARGS=--ab`: the base variant is the tuned model's own base, packaged untuned with the tuned
model's prompt format (the training image's package-base), not a fixed model."""

import json
import shutil

from stack_runner.__main__ import _base_variant


def test_the_base_variant_is_the_tuned_artifact_s_base_untuned(tmp_path, tiny_dolly_model_dir):
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_dolly_model_dir, tuned)
    (tuned / "manifest.json").write_text(
        json.dumps(
            {
                "base_model": str(tiny_dolly_model_dir),
                "method": "lora",
                "prompt_format": "dolly",
                "dtype": "float32",
                "hyperparameters": {"seed": 42, "trust_remote_code": False},
            }
        )
    )
    base = _base_variant(tuned, tmp_path / "base-model")
    manifest = json.loads((base / "manifest.json").read_text())
    assert manifest["method"] == "untuned" and manifest["base_model"] == str(tiny_dolly_model_dir)
    # Dolly's `### End` is one added special token in its tokenizer: the variant stops on it, as the tuned one does
    end = json.loads((base / "tokenizer.json").read_text())["added_tokens"]
    end_id = next(t["id"] for t in end if t["content"] == "### End")
    assert manifest["prompt_format"] == "dolly" and end_id in manifest["stop_token_ids"]
    assert list(base.glob("*.safetensors"))
