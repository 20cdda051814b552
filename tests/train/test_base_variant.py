"""The A/B test's base variant (trainer.base_variant, the image's `package-base`): the untuned base model packaged
as a training job packages a tuned one, so the two variants differ in their weights and nothing else."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile

import pytest
from trainer import base_variant
from trainer.base_variant import PackageRequest, package_base, parse_args
from trainer.errors import UserError
from trainer.modeling import BaseModel

from .conftest import REPO, csv_text, faq_rows, make_job, run_train, tiny_hyperparameters

PACKAGE_BASE = REPO / "containers" / "train" / "package-base"
TEMPLATE_TEXT = ("### Instruction", "### Response", "### End", "Below is an instruction")
QUESTION = "What is Amazon SageMaker?"


def pickled_copy(model_dir, target):
    """The model as databricks/dolly-v2-3b publishes its weights: only a pickled pytorch_model.bin. (Transformers
    5 saves safetensors whatever it is asked, so the pickle is written with torch.save, as older versions did.)"""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(model_dir, target)
    torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def read_manifest(model_dir) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


@pytest.mark.slow
def test_pickled_dolly_base_becomes_a_servable_safetensors_archive(tmp_path, tiny_dolly_model_dir):
    import torch
    from serve import create_app
    from serve.config import ServeConfig
    from serve.predictor import Predictor
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = pickled_copy(tiny_dolly_model_dir, tmp_path / "dolly-v2-tiny")
    archive = tmp_path / "out" / "model.tar.gz"
    result = subprocess.run(
        [sys.executable, str(PACKAGE_BASE), "--model", str(base), "--output", str(archive)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [p.name for p in archive.parent.iterdir()] == ["model.tar.gz"]  # no staging left behind

    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert all("/" not in name for name in names), names  # the files at the root, as SageMaker's model.tar.gz
        assert "model.safetensors" in names and not [n for n in names if n.endswith(".bin")]
        tar.extractall(tmp_path / "model", filter="data")
    model_dir = tmp_path / "model"
    manifest = read_manifest(model_dir)
    assert manifest["method"] == "untuned" and manifest["prompt_format"] == "dolly"
    assert manifest["base_model"] == str(base) and manifest["dtype"] == "float32"

    original = AutoModelForCausalLM.from_pretrained(tiny_dolly_model_dir).state_dict()
    packaged = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).state_dict()
    assert all(torch.equal(original[k], packaged[k]) for k in original)  # untuned: the base's own weights
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.convert_tokens_to_ids("### End") in GenerationConfig.from_pretrained(model_dir).eos_token_id

    config = ServeConfig(model_dir=model_dir, max_batch_size=4, default_max_new_tokens=24, torch_threads=1)
    predictor = Predictor(config)
    predictor.load_now()
    assert predictor.ready, predictor.reason
    try:
        client = create_app(config, predictor=predictor).test_client()
        reply = client.post("/invocations", json={"inputs": QUESTION, "parameters": {"details": True}})
        assert reply.status_code == 200, reply.get_data(as_text=True)
        [answer] = reply.get_json()
        assert answer["details"]["generated_tokens"] >= 1
        assert not any(marker in answer["generated_text"] for marker in TEMPLATE_TEXT), answer["generated_text"]
    finally:
        predictor.engine.stop()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("base_fixture", "prompt_format"),
    [("tiny_dolly_model_dir", "dolly"), ("tiny_plain_model_dir", "dolly"), ("tiny_model_dir", "chat_template")],
)
def test_base_and_tuned_variant_see_the_same_prompt_and_stop_alike(request, tmp_path, base_fixture, prompt_format):
    from trainer.prompts import prompt_text
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    base = request.getfixturevalue(base_fixture)
    rows = csv_text(faq_rows(12), header=["question", "answer"])
    hyperparameters = tiny_hyperparameters(base, max_steps=2, evaluation="deferred")
    job = make_job(tmp_path / "job", hyperparameters, {"train/faq.csv": rows})
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tuned = job / "model"

    by_model = package_base(PackageRequest(model=str(base), output=tmp_path / "by-model"), tmp_path / "cache")
    # What compose's `ab` profile runs: everything taken from the trained artifact's manifest.
    matched_request = parse_args(["--tuned-artifact", str(tuned), "--output", str(tmp_path / "matched")])
    matched = package_base(matched_request, tmp_path / "cache")

    tuned_tokenizer = AutoTokenizer.from_pretrained(tuned)
    tuned_generation = GenerationConfig.from_pretrained(tuned)
    for untuned in (by_model, matched):
        manifest, tuned_manifest = read_manifest(untuned), read_manifest(tuned)
        assert manifest["method"] == "untuned" and manifest["prompt_format"] == prompt_format
        for key in ("base_model", "prompt_format", "dtype", "stop_token_ids", "stop_strings"):
            assert manifest[key] == tuned_manifest[key], key
        tokenizer = AutoTokenizer.from_pretrained(untuned)
        assert prompt_text(tokenizer, QUESTION) == prompt_text(tuned_tokenizer, QUESTION)
        assert prompt_text(tokenizer, QUESTION, "some context") == prompt_text(
            tuned_tokenizer, QUESTION, "some context"
        )
        assert (tokenizer.pad_token, tokenizer.eos_token) == (tuned_tokenizer.pad_token, tuned_tokenizer.eos_token)
        generation = GenerationConfig.from_pretrained(untuned)
        assert generation.eos_token_id == tuned_generation.eos_token_id
        assert generation.stop_strings == tuned_generation.stop_strings
        assert AutoConfig.from_pretrained(untuned).vocab_size == AutoConfig.from_pretrained(tuned).vocab_size


def test_the_base_floating_type_is_kept_unless_dtype_says(tmp_path, tiny_model_dir):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    bf16_base = shutil.copytree(tiny_model_dir, tmp_path / "bf16-base")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_base)

    for dtype, expected in (("auto", "bfloat16"), ("float16", "float16")):
        out = package_base(PackageRequest(model=str(bf16_base), output=tmp_path / dtype, dtype=dtype), tmp_path)
        assert read_manifest(out)["dtype"] == expected
        with safe_open(out / "model.safetensors", "pt") as weights:
            assert {str(weights.get_tensor(k).dtype) for k in weights.keys()} == {f"torch.{expected}"}  # noqa: SIM118


def test_a_previous_artifact_is_replaced_and_a_failure_leaves_it_whole(tmp_path, tiny_model_dir, monkeypatch):
    from trainer import base_variant

    out = tmp_path / "out" / "model"
    package_base(PackageRequest(model=str(tiny_model_dir), output=out), tmp_path)
    (out / "from-the-first-run").touch()
    package_base(PackageRequest(model=str(tiny_model_dir), output=out), tmp_path)
    assert (out / "manifest.json").exists() and not (out / "from-the-first-run").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]
    assert oct(out.stat().st_mode & 0o777) == "0o755"  # a non-root server lists it
    (out / "from-the-second-run").touch()

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(base_variant, "save_artifact", disk_full)
    with pytest.raises(OSError, match="No space left"):
        package_base(PackageRequest(model=str(tiny_model_dir), output=out), tmp_path)
    assert (out / "manifest.json").exists() and (out / "from-the-second-run").exists()
    monkeypatch.setattr(base_variant, "_write_archive", disk_full)
    archive = tmp_path / "out" / "model.tar.gz"
    with pytest.raises(OSError):
        package_base(PackageRequest(model=str(tiny_model_dir), output=archive), tmp_path)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no archive, no staging folder


def test_input_errors_name_what_is_wrong(tmp_path, tiny_plain_model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("mine")
    cases = [
        ({"model": str(tmp_path / "missing")}, "no such directory"),
        ({"model": str(tmp_path / "empty")}, "no config.json"),
        ({"model": str(tmp_path / "config-only")}, "no weights to load"),
        ({"model": str(tiny_plain_model_dir / "config.json")}, "this is a file"),
        ({"model": str(tiny_plain_model_dir), "prompt_format": "chat_template"}, "needs a tokenizer with a chat"),
        ({"model": str(tiny_plain_model_dir), "output": tmp_path / "not-a-model"}, "not an artifact"),
        ({"model": str(tiny_plain_model_dir), "output": tmp_path / "dir.tar.gz"}, "a directory; a path ending in"),
    ]
    (tmp_path / "dir.tar.gz").mkdir()
    for fields, message in cases:
        request = PackageRequest(**{"output": tmp_path / "out", **fields})
        with pytest.raises(UserError, match=message):
            package_base(request, tmp_path)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="'bf8' is not one of"):
        PackageRequest(model="m", output=tmp_path / "out", dtype="bf8")


def test_tuned_artifact_arguments(tmp_path):
    out = ["--output", str(tmp_path / "out")]
    with pytest.raises(UserError, match="--model is required"):
        parse_args(out)
    with pytest.raises(UserError, match=r"manifest\.json does not exist"):
        parse_args(["--tuned-artifact", str(tmp_path), *out])
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(UserError, match="not a training artifact's manifest"):
        parse_args(["--tuned-artifact", str(tmp_path), *out])
    manifest = {
        "base_model": "model channel (x)",
        "prompt_format": "dolly",
        "dtype": "bfloat16",
        "hyperparameters": {"seed": 7, "trust_remote_code": False},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="--model is required"):  # a channel's model is named by description only
        parse_args(["--tuned-artifact", str(tmp_path), *out])
    request = parse_args(["--tuned-artifact", str(tmp_path), "--model", "/models/x", "--dtype", "float32", *out])
    assert (request.model, request.prompt_format, request.dtype, request.seed) == ("/models/x", "dolly", "float32", 7)
    # A hub base: the commit the training job loaded, so the pair is compared on the very same weights.
    commit = "0" * 40
    manifest |= {"base_model": "org/model", "base_model_revision": "v1", "base_model_commit": commit}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert parse_args(["--tuned-artifact", str(tmp_path), *out]).revision == commit
    assert parse_args(["--tuned-artifact", str(tmp_path), "--revision", "v2", *out]).revision == "v2"


def test_revision_reaches_the_hub_load_and_the_manifest(tmp_path, tiny_model_dir, monkeypatch):
    with pytest.raises(UserError, match="--revision v1: applies to hub models only"):
        package_base(PackageRequest(model=str(tiny_model_dir), output=tmp_path / "out", revision="v1"), tmp_path)
    with pytest.raises(UserError, match="--revision must not be empty"):
        PackageRequest(model="org/model", output=tmp_path / "out", revision=" ")
    asked = []

    def hub(model_id, channel, cache_dir, revision):  # stands in for the hub: the tiny model at a pinned commit
        asked.append((model_id, revision))
        return BaseModel(str(tiny_model_dir), model_id, revision, "c" * 40)

    monkeypatch.setattr(base_variant, "resolve_base_model", hub)
    out = package_base(PackageRequest(model="org/model", output=tmp_path / "out", revision="v1"), tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert asked == [("org/model", "v1")]
    assert (manifest["base_model_revision"], manifest["base_model_commit"]) == ("v1", "c" * 40)


def test_the_image_command_exits_2_with_the_reason(tmp_path):
    args = ["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, str(PACKAGE_BASE), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no such directory" in result.stdout
    assert not (tmp_path / "out").exists()
