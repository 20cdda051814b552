"""The training image's `train` entry point run for real, as SageMaker would, against a temporary /opt/ml tree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.tiny_model import build_tiny_model
from trainer.checkpoints import mark_complete

from .conftest import (
    REPO,
    TRAIN_EXECUTABLE,
    csv_text,
    faq_rows,
    job_env,
    make_job,
    plant_pickle,
    run_train,
    set_hyperparameters,
    tiny_hyperparameters,
    train_until_sigterm,
)

pytestmark = pytest.mark.slow


def test_train_writes_a_servable_artifact_and_reports(tmp_path, tiny_model_dir, faq_csv_small):
    job = make_job(tmp_path, tiny_hyperparameters(tiny_model_dir), {"train/faq.csv": faq_csv_small}, encode="sdk_v2")
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (job / "output" / "failure").exists()

    model_dir = job / "model"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["method"] == "lora" and manifest["base_model"] == str(tiny_model_dir)
    assert manifest["training"]["steps"] == 4
    assert manifest["metrics"]["validation"]["rouge_l"]["base"] is not None
    assert not list(model_dir.glob("*.bin")) and (model_dir / "model.safetensors").exists()
    assert list(manifest["weights_sha256"]) == ["model.safetensors"]
    assert not (model_dir / "adapter_config.json").exists()  # LoRA merged, not shipped as an adapter
    assert all(p.stat().st_mode & 0o004 for p in model_dir.iterdir()), "a non-root server must read the artifact"
    for name in ("eval_report.json", "sample_answers.jsonl", "loss_curve.png", "data_report.json"):
        assert (job / "output" / "data" / name).stat().st_size > 0, name
    assert list((job / "checkpoints").glob("checkpoint-*"))

    # Every metric regex we ship for CloudWatch finds a value in the log.
    for definition in json.loads((REPO / "containers/train/metric_definitions.json").read_text()):
        assert re.search(definition["Regex"], result.stdout), definition["Name"]

    # The artifact loads with plain Transformers and answers through its own chat template.
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generation = GenerationConfig.from_pretrained(model_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token_id in generation.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is SageMaker?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_model_and_validation_channels_full_fine_tuning_raw_encoding(tmp_path, tiny_plain_model_dir):
    rows = faq_rows(16)
    job = make_job(
        tmp_path,
        {**tiny_hyperparameters("ignored-because-of-the-model-channel"), "method": "full", "max_steps": 2},
        {
            "train/train.jsonl": "".join(json.dumps({"instruction": q, "response": a}) + "\n" for q, a in rows[:12]),
            "validation/val.csv": csv_text(rows[12:]),
        },  # no header row, like the FAQ file
    )
    shutil.copytree(tiny_plain_model_dir, job / "input" / "data" / "model")
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    assert manifest["method"] == "full" and manifest["prompt_format"] == "dolly"
    assert manifest["base_model"].startswith("model channel")
    assert manifest["metrics"]["validation"]["count"] == 4
    template = (job / "model" / "chat_template.jinja").read_text()
    assert "### Instruction:" in template and "### End" in template
    # "### End" is several tokens in this vocabulary: it travels as a stop string, for the server to end on.
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(job / "model").stop_strings == ["### End"]
    assert manifest["stop_strings"] == ["### End"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing train channel", "missing required input channel 'train'"),
        ("empty file", "faq.csv: the file is empty"),
        ("malformed csv", "faq.csv: malformed CSV"),
        ("unknown column", "unknown column 'question'"),
        ("unknown hyperparameter", "unknown hyperparameter 'lora_rank'"),
        ("wrong type", "hyperparameter 'epochs': expected a number, got 'many'"),
        ("lora rank 0", "hyperparameter 'lora_r': 0 must be at least 1"),
    ],
)
def test_bad_input_fails_with_a_clear_reason(tmp_path, tiny_model_dir, faq_csv_small, case, message):
    hyperparameters = tiny_hyperparameters(tiny_model_dir)
    files = {"train/faq.csv": faq_csv_small}
    if case == "missing train channel":
        files = {"validation/faq.csv": faq_csv_small}
    elif case == "empty file":
        files = {"train/faq.csv": ""}
    elif case == "malformed csv":
        files = {"train/faq.csv": 'question,answer\n"q1","a1"\n"q2","a2","a3"\n'}
    elif case == "unknown column":
        hyperparameters["csv_header"] = "true"
        files = {"train/faq.csv": "query,reply\nq,a\n"}
    elif case == "unknown hyperparameter":
        hyperparameters["lora_rank"] = 8
    elif case == "wrong type":
        hyperparameters["epochs"] = "many"
    elif case == "lora rank 0":
        hyperparameters["lora_r"] = 0
    job = make_job(tmp_path, hyperparameters, files)
    result = run_train(job, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    failure = (job / "output" / "failure").read_text()
    assert message in failure.splitlines()[0]
    assert not (job / "model" / "manifest.json").exists()


# The trained token embeddings live in the adapter checkpoint, beside LoRA: a resumed job must find them there.
@pytest.mark.parametrize("token_embeddings", ["false", "auto"], ids=["lora", "lora+token-embeddings"])
def test_sigterm_checkpoints_and_a_rerun_resumes(tmp_path, tiny_model_dir, faq_csv_small, token_embeddings):
    job = make_job(
        tmp_path,
        tiny_hyperparameters(
            tiny_model_dir,
            max_steps=40,
            save_steps=100,
            per_device_batch_size=1,
            lora_train_token_embeddings=token_embeddings,
        ),
        {"train/faq.csv": faq_csv_small},
    )
    code, log, checkpoints = train_until_sigterm(job, at_step=3)
    assert code == 143, log[-4000:]
    assert checkpoints, "no checkpoint saved on SIGTERM"
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 3 <= stopped_at < 40
    assert (job / "output" / "failure").read_text().startswith("TrainingInterrupted")
    assert not (job / "model" / "manifest.json").exists()

    rerun = run_train(job)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from {checkpoints[-1]}" in rerun.stdout
    assert "base model evaluation reused" in rerun.stdout
    first_step = int(re.search(r"metrics: step=(\d+)/", rerun.stdout).group(1))
    assert first_step == stopped_at + 1  # the step count continues
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 40 and manifest["training"]["resumed_from"].endswith(checkpoints[-1].name)
    assert not (job / "output" / "failure").exists()
    if token_embeddings == "auto":  # the trained rows reached the artifact, merged into the (still tied) embeddings
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(job / "model").get_input_embeddings().weight
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
        assert (tuned != base).any(dim=1).sum() > 0


def test_a_resume_refuses_pickles_planted_in_the_trainers_own_state_files(tmp_path, tiny_model_dir, faq_csv_small):
    """Without DeepSpeed the Trainer reads its RNG, optimizer and scheduler state with weights_only=True; the job
    checks every one of them first and names each planted file, and none of them runs."""
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir, max_steps=2, save_steps=2, eval_base_model=False, eval_max_samples=1, eval_train_samples=0
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    first = run_train(job)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    checkpoint = job / "checkpoints" / "checkpoint-2"
    marker = tmp_path / "pwned"
    planted = ("rng_state.pth", "optimizer.pt", "scheduler.pt")
    for name in planted:
        assert (checkpoint / name).exists(), name
        plant_pickle(checkpoint / name, marker)
    mark_complete(checkpoint, 2)  # whoever can write the checkpoint can write its marker too
    set_hyperparameters(job, max_steps=4)

    rerun = run_train(job)
    assert not marker.exists(), "a pickle planted in the checkpoint ran on resume"
    assert rerun.returncode == 2, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    failure = (job / "output" / "failure").read_text()
    assert failure.startswith(f"CheckpointError: refusing to resume from {checkpoint}"), failure[:2000]
    for name in planted:
        assert f"{name} (builtins.getattr" in failure, (name, failure[:2000])


def _hub_cache_with_two_revisions(root, build) -> tuple[Path, str]:
    """An offline Hugging Face hub cache holding org/tiny at two commits: `main` (fp32) and the tag `v2`, whose
    config, weights (bf16) and tokenizer each carry a sign of v2. Returns the cache and v2's commit."""
    import torch
    from transformers import AutoModelForCausalLM

    repo = root / "hub" / "models--org--tiny"
    commits = {"main": "a" * 40, "v2": "b" * 40}
    for ref, commit in commits.items():
        snapshot = build(repo / "snapshots" / commit)
        if ref == "v2":
            model = AutoModelForCausalLM.from_pretrained(snapshot)
            model.config.fixture_revision = "v2"  # config.json
            model.to(torch.bfloat16).save_pretrained(snapshot)  # weights (and dtype in the config)
            tokenizer_config = json.loads((snapshot / "tokenizer_config.json").read_text())
            tokenizer_config["model_max_length"] = 2000  # tokenizer
            (snapshot / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return root / "hub", commits["v2"]


def test_a_hub_model_is_loaded_at_its_revision_and_the_manifest_records_the_commit(tmp_path, faq_csv_small):
    cache, commit = _hub_cache_with_two_revisions(tmp_path, build_tiny_model)
    hyperparameters = tiny_hyperparameters("org/tiny", revision="v2", max_steps=1, eval_max_samples=1)
    job = make_job(tmp_path / "job", hyperparameters, {"train/faq.csv": faq_csv_small})
    result = run_train(job, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"base model org/tiny at revision v2 (commit {commit})" in result.stdout

    model_dir = job / "model"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert (manifest["base_model"], manifest["base_model_revision"], manifest["base_model_commit"]) == (
        "org/tiny",
        "v2",
        commit,
    )
    assert manifest["hyperparameters"]["revision"] == "v2"
    assert manifest["dtype"] == "bfloat16"  # v2's config, not main's (float32)
    assert json.loads((model_dir / "config.json").read_text())["fixture_revision"] == "v2"  # v2's model
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["model_max_length"] == 2000  # v2's tokenizer


def test_usage_error_for_other_commands():
    result = subprocess.run([sys.executable, str(TRAIN_EXECUTABLE), "serve"], capture_output=True, text=True)
    assert result.returncode == 2 and "training image" in result.stderr


def test_deferred_evaluation_writes_the_same_report_later(tmp_path, tiny_model_dir, faq_csv_small):
    """`evaluation=deferred`: the job writes the artifact alone; the image's `evaluate` adds the A/B report."""
    files = {"train/faq.csv": faq_csv_small}
    job = make_job(tmp_path / "deferred", tiny_hyperparameters(tiny_model_dir, evaluation="deferred"), files)
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    assert manifest["evaluation"] == "deferred" and manifest["metrics"] == {}
    assert not (job / "output" / "data" / "eval_report.json").exists()
    assert "evaluation deferred" in result.stdout

    evaluated = subprocess.run(
        [sys.executable, str(TRAIN_EXECUTABLE.parent / "evaluate")],
        env=job_env(job),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    report = json.loads((job / "output" / "data" / "eval_report.json").read_text())
    assert set(report["comparison"]) == {"validation", "train_sample"}
    for rows in report["comparison"].values():
        assert rows["rouge_l"]["base"] is not None and rows["rouge_l"]["tuned"] is not None
    assert report["training"] == manifest["training"] and report["base_model"] == str(tiny_model_dir)
    assert re.search(r"metrics: base_eval_loss=\S+ .*tuned_rouge_l=", evaluated.stdout)
    answers = [json.loads(line) for line in (job / "output" / "data" / "sample_answers.jsonl").open()]
    assert answers and all(a["base_answer"] is not None and a["tuned_answer"] is not None for a in answers)
    assert not (job / "output" / "failure").exists()


def test_evaluate_before_training_says_what_to_run_first(tmp_path, tiny_model_dir, faq_csv_small):
    job = make_job(tmp_path, tiny_hyperparameters(tiny_model_dir), {"train/faq.csv": faq_csv_small})
    result = subprocess.run(
        [sys.executable, str(TRAIN_EXECUTABLE.parent / "evaluate")],
        env=job_env(job),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "holds no finished artifact (no manifest.json): run the training job first" in result.stdout
    assert not (job / "output" / "failure").exists()  # the training job's verdict is not the evaluation's to write


@pytest.fixture(scope="module")
def tiny_bf16_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model published in bf16, as dolly-v2-3b and most hub models are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


def _weight_dtypes(model_dir) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {str(f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator


@pytest.mark.parametrize(
    ("save_dtype", "expected", "weights"),
    [
        ("auto", "bfloat16", {"BF16"}),  # the base model's type: half the size of fp32
        ("float32", "float32", {"F32"}),
    ],
)
def test_the_artifact_keeps_the_base_models_dtype_unless_told(
    tmp_path, tiny_bf16_model_dir, faq_csv_small, save_dtype, expected, weights
):
    hyperparameters = tiny_hyperparameters(tiny_bf16_model_dir, save_dtype=save_dtype, evaluation="deferred")
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((job / "model" / "manifest.json").read_text())["dtype"] == expected
    assert _weight_dtypes(job / "model") == weights


def test_an_fp32_base_gives_an_fp32_artifact(tmp_path, tiny_model_dir, faq_csv_small):
    job = make_job(
        tmp_path, tiny_hyperparameters(tiny_model_dir, evaluation="deferred"), {"train/faq.csv": faq_csv_small}
    )
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((job / "model" / "manifest.json").read_text())["dtype"] == "float32"
    assert _weight_dtypes(job / "model") == {"F32"}
