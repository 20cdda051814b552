"""A training job with retrieval, run for real: the index in the artifact, the manifest's entry, the report's
third column and the paraphrased questions; and when `retrieval=auto` stays off."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.job import Rank, _build_index, _use_retrieval, load_datasets
from trainer.prompts import DOCUMENTS_PREAMBLE
from trainer.retrieval import RetrievalIndex
from trainer.sagemaker import read_job

from .conftest import TRAIN_EXECUTABLE, csv_text, faq_rows, job_env, make_job, run_train, tiny_hyperparameters

GUIDE = """# Endpoints

## Autoscaling

An endpoint scales between its minimum and maximum instance counts on the invocations per instance metric.

## Cost

You pay for each instance hour of an endpoint, whether it serves requests or not.
"""
VALIDATION = [["How do I stop a notebook?", "Choose Stop in the console."]]
PARAPHRASES = [
    {"question": "What's Amazon SageMaker, in short?", "answer": faq_rows(1)[0][1]},
    {"question": "Where can I use SageMaker (which Regions)?", "answer": faq_rows(2)[1][1]},
]


@pytest.mark.slow
def test_a_job_with_retrieval_ships_its_index_and_reports_three_columns(tmp_path, tiny_model_dir):
    job = make_job(
        tmp_path,
        tiny_hyperparameters(tiny_model_dir, max_steps=2, eval_max_samples=2, eval_train_samples=2),
        {
            "train/faq.csv": csv_text(faq_rows(40)),  # 40 training rows: retrieval=auto turns on
            "validation/val.csv": csv_text(VALIDATION),
            "documents/guides/endpoints.md": GUIDE,
            "paraphrases/para.jsonl": "".join(json.dumps(row) + "\n" for row in PARAPHRASES),
        },
    )
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "retrieval: indexed 42 passages (40 training rows, 2 from 1 document file(s)), BM25 and title embeddings; k=3"
    ) in result.stdout

    model_dir = job / "model"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    # A documents channel: no `auto` gate (its passages are not rows the model trained on).
    assert manifest["retrieval"] == {"dir": "retrieval", "k": 3, "passages": 42, "documents": 2, "min_margin": 0.0}
    retrieval_dir = model_dir / "retrieval"
    assert sorted(p.name for p in retrieval_dir.iterdir()) == [
        "bm25_text",
        "bm25_title",
        "dense_title.npy",
        "passages.jsonl",
        "retrieval.json",
    ]
    assert all(p.stat().st_mode & 0o004 for p in retrieval_dir.rglob("*")), "a non-root server must read the index"
    passages = [json.loads(line) for line in (retrieval_dir / "passages.jsonl").read_text().splitlines()]
    assert passages[0]["source"] == "faq.csv#1" and passages[39]["source"] == "faq.csv#40"
    assert [p["source"] for p in passages[40:]] == ["guides/endpoints.md#p1", "guides/endpoints.md#p2"]
    assert passages[41]["title"] == "endpoints.md: Endpoints > Cost"
    indexed = {p["title"] for p in passages}  # never the validation or paraphrased questions
    assert not indexed & {VALIDATION[0][0], *(row["question"] for row in PARAPHRASES)}
    index = RetrievalIndex.load(retrieval_dir)
    assert index.search("How much does an endpoint cost per hour?", 3)[0].passage.id == 41

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template.startswith(DOCUMENTS_PREAMBLE)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q?"}],
        documents=[{"title": "T", "text": "X"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert "Q?\n\nInput:\n[1] T\nX" in prompt

    report = json.loads((job / "output" / "data" / "eval_report.json").read_text())
    comparison = report["comparison"]
    assert set(comparison) == {"validation", "train_sample", "paraphrased"}
    assert comparison["paraphrased"]["count"] == 2
    for rows in comparison.values():
        assert rows["rouge_l"]["base"] is not None and rows["rouge_l"]["tuned"] is not None
        assert rows["rouge_l"]["tuned_retrieval"] is not None

    # The deferred `evaluate` command reads the index from the artifact and reports the same three columns.
    evaluated = subprocess.run(
        [sys.executable, str(TRAIN_EXECUTABLE.parent / "evaluate")],
        env=job_env(job),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert "retrieval: the artifact's index, 42 passages, k=3" in evaluated.stdout
    again = json.loads((job / "output" / "data" / "eval_report.json").read_text())["comparison"]
    assert again["paraphrased"]["rouge_l"]["tuned_retrieval"] is not None


@pytest.mark.parametrize(("rows", "on"), [(39, False), (40, True)])
def test_retrieval_auto_is_on_from_forty_training_rows(tmp_path, rows, on, monkeypatch):
    make_job(
        tmp_path,
        {},
        {"train/faq.csv": csv_text(faq_rows(rows)), "validation/val.csv": csv_text(VALIDATION)},
    )
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    job = read_job()
    config = TrainConfig.from_hyperparameters({})
    datasets = load_datasets(config, job)
    assert len(datasets.train) == rows and _use_retrieval(config, datasets) is on
    # A validation_fraction split counts the rows left for training: 40 rows, 15% held out, stay below 40.
    assert not _use_retrieval(config, load_datasets(config, _without_validation(job)))


def _without_validation(job):
    import dataclasses

    return dataclasses.replace(job, channels={"train": job.train_dir})


def test_a_documents_channel_with_retrieval_off_is_refused(tmp_path, monkeypatch):
    make_job(tmp_path, {}, {"train/faq.csv": csv_text(faq_rows(12)), "documents/a.md": "Some text."})
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    job = read_job()
    with pytest.raises(ConfigError, match=r"'retrieval': the documents channel is only used for retrieval"):
        load_datasets(TrainConfig.from_hyperparameters({"retrieval": "off"}), job)
    datasets = load_datasets(TrainConfig.from_hyperparameters({}), job)
    assert _use_retrieval(TrainConfig.from_hyperparameters({}), datasets)  # auto: on with documents, 10 rows
    assert [p.source for p in datasets.documents] == ["a.md#p1"]


@pytest.mark.parametrize(("value", "dense"), [("true", True), ("false", False)])
def test_retrieval_dense_decides_whether_the_index_has_embeddings(tmp_path, monkeypatch, value, dense):
    make_job(tmp_path, {}, {"train/faq.csv": csv_text(faq_rows(40))})
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    config = TrainConfig.from_hyperparameters({"retrieval_dense": value})
    index = _build_index(config, load_datasets(config, read_job()), Rank())
    assert (index.dense is not None) is dense
    settings = json.loads((index.save(tmp_path / "retrieval") / "retrieval.json").read_text())
    assert ("dense" in settings) is dense and (tmp_path / "retrieval" / "dense_title.npy").exists() is dense


@pytest.mark.parametrize(
    ("rows", "hyperparameters", "files", "gate"),
    [
        (40, {}, {}, "calibrated"),
        (12, {"retrieval": "on"}, {}, "auto: 12 training rows to calibrate on, fewer than 40"),
        (40, {}, {"documents/guide.md": GUIDE}, "auto: a documents channel is indexed"),
        (40, {"retrieval_min_margin": "0"}, {}, 0.0),
        (12, {"retrieval": "on", "retrieval_min_margin": "0.25"}, {}, 0.25),
    ],
)
def test_the_job_calibrates_its_gate_on_the_training_rows(tmp_path, monkeypatch, rows, hyperparameters, files, gate):
    validation = {"validation/val.csv": csv_text(VALIDATION)}  # every row trains: none split off
    make_job(tmp_path, {}, {"train/faq.csv": csv_text(faq_rows(rows)), **validation, **files})
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    config = TrainConfig.from_hyperparameters(hyperparameters)
    index = _build_index(config, load_datasets(config, read_job()), Rank())
    if gate == "calibrated":
        assert index.gate.min_margin > 0 and "of 40 training rows" in index.gate.calibration
        assert json.loads((index.save(tmp_path / "r") / "retrieval.json").read_text())["gate"] == index.gate.to_dict()
    elif isinstance(gate, str):
        assert index.gate.min_margin == 0 and index.gate.calibration == gate
    else:
        assert index.gate.min_margin == gate and index.gate.calibration == "retrieval_min_margin"
