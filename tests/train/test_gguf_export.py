"""The artifact's GGUF (trainer.gguf_export): written by llama.cpp's own converter, recorded in the manifest, and
never the reason a job fails (no converter, an architecture or tokenizer it does not know: the log says why)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from trainer import gguf_export
from trainer.artifact import save_artifact
from trainer.modeling import EMBEDDED_GGUF_FILE, EMBEDDED_PACKAGE


@pytest.fixture(scope="module")
def smollm_tokenized_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's own tokenizer (from the embedded GGUF), which llama.cpp's converter
    knows; the tiny byte-level test tokenizer it does not."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    package = Path(importlib.util.find_spec(EMBEDDED_PACKAGE).submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=EMBEDDED_GGUF_FILE)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("smollm-tokenized") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_q8_0_is_written_by_the_pinned_converter_and_carries_the_chat_template(smollm_tokenized_model, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(smollm_tokenized_model, model_dir)
    entry = gguf_export.export(model_dir, "q8_0")
    gguf = model_dir / "model.q8_0.gguf"
    assert entry["file"] == gguf.name and entry["quantization"] == "q8_0"
    assert entry["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest() and entry["bytes"] == gguf.stat().st_size
    assert entry["converter"]["source"] == "llama-cpp-python 0.3.36 sdist from PyPI, vendor/llama.cpp/"

    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
    try:
        template = llama_cpp.llama_model_chat_template(model, None).decode()
        assert "<|im_start|>" in template  # the prompt format travels in the GGUF too
    finally:
        llama_cpp.llama_model_free(model)


@pytest.mark.parametrize(("quantization", "file_type"), [("q4_k_m", 15), ("q4_0", 2)])  # llama.cpp's LLAMA_FTYPE_*
def test_4_bit_files_go_through_llamacpps_quantizer(smollm_tokenized_model, tmp_path, quantization, file_type):
    model_dir = tmp_path / "model"
    shutil.copytree(smollm_tokenized_model, model_dir)
    entry = gguf_export.export(model_dir, quantization)
    gguf = model_dir / f"model.{quantization}.gguf"
    assert entry["file"] == gguf.name and gguf.is_file()
    assert sorted(p.name for p in model_dir.glob("*.gguf")) == [gguf.name]  # no f16 left behind

    from gguf import GGUFReader

    field = GGUFReader(gguf).fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == file_type


def test_a_model_the_converter_cannot_read_keeps_its_safetensors_and_says_why(tiny_model_dir, tmp_path, caplog):
    """The tiny byte-level tokenizer is not in llama.cpp's table of BPE pre-tokenizers: the converter refuses it,
    as it refuses an architecture it does not know."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="trainer.gguf_export"):
        save_artifact(model, tokenizer, [tokenizer.eos_token_id], tmp_path / "model", {}, gguf_quantization="q8_0")
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert "gguf" not in manifest and manifest["weights_sha256"]
    assert not list((tmp_path / "model").glob("*.gguf"))
    assert "llama.cpp's converter could not convert this model" in caplog.text
    assert "BPE pre-tokenizer was not recognized" in caplog.text
    assert "the artifact has safetensors only" in caplog.text


def test_without_the_converter_the_job_goes_on(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(gguf_export.CONVERTER_ENV, str(tmp_path / "nowhere" / "convert_hf_to_gguf.py"))
    with caplog.at_level(logging.WARNING, logger="trainer.gguf_export"):
        assert gguf_export.export(tmp_path, "q8_0") is None
    assert "no llama.cpp converter at" in caplog.text and "docker/install_gguf_converter.py" in caplog.text


def test_none_writes_nothing(tmp_path):
    assert gguf_export.export(tmp_path, "none") is None
    assert not list(tmp_path.iterdir())


def test_the_artifact_names_its_gguf_in_the_manifest(smollm_tokenized_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm_tokenized_model)
    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenized_model)
    model_dir = tmp_path / "model"
    (model_dir).mkdir()
    (model_dir / "model.q4_k_m.gguf").write_bytes(b"an earlier run's")
    save_artifact(model, tokenizer, [tokenizer.eos_token_id], model_dir, {"base_model": "x"}, gguf_quantization="q8_0")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["gguf"]["file"] == "model.q8_0.gguf"
    assert sorted(p.name for p in model_dir.glob("*.gguf")) == ["model.q8_0.gguf"]
    assert (model_dir / "model.q8_0.gguf").stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_the_jobs_report_shows_what_quantization_cost(smollm_tokenized_model, tmp_path):
    """The job writes the q8_0 GGUF, loads it back and asks it the evaluation's questions as the server would: the
    report and the manifest's metrics carry a GGUF column beside the full-precision model."""
    from .conftest import csv_text, faq_rows, make_job, run_train, tiny_hyperparameters

    hyperparameters = tiny_hyperparameters(
        smollm_tokenized_model, max_steps=1, eval_max_samples=2, eval_train_samples=2, gguf_quantization="q8_0"
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": csv_text(faq_rows(12))})
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "evaluating model.q8_0.gguf (q8_0), loaded back dequantized" in result.stdout + result.stderr

    comparison = json.loads((job / "output" / "data" / "eval_report.json").read_text())["comparison"]
    rouge = comparison["train_sample"]["rouge_l"]
    assert rouge["gguf"] is not None and rouge["delta_gguf"] == pytest.approx(rouge["gguf"] - rouge["tuned"])
    loss = comparison["validation"]["loss"]
    assert abs(loss["gguf"] - loss["tuned"]) < 0.05  # q8_0 is near-lossless, and the column is that file's
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    assert manifest["metrics"] == comparison and manifest["gguf"]["file"] == "model.q8_0.gguf"
    samples = (job / "output" / "data" / "sample_answers.jsonl").read_text().splitlines()
    assert all("gguf_answer" in json.loads(line) for line in samples)
    assert "| GGUF |" in (job / "output" / "data" / "eval_report.md").read_text()


def test_a_gguf_transformers_cannot_read_leaves_the_report_without_its_column(tmp_path, caplog):
    from trainer.modeling import load_gguf

    (tmp_path / "model.q8_0.gguf").write_bytes(b"GGUF but not really")
    with caplog.at_level(logging.WARNING, logger="trainer.modeling"):
        assert load_gguf(tmp_path, "model.q8_0.gguf") is None
    assert "Transformers could not load model.q8_0.gguf back for evaluation" in caplog.text
    assert "the report has no GGUF column" in caplog.text
