"""`report_to`: TensorBoard event files in output/tensorboard and an MLflow run (a local `file:` store, no server),
each with the training loss, the validation answer loss of `eval_steps` and the A/B evaluation's results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from trainer import tracking
from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.sagemaker import read_job

from .conftest import TRAIN_EXECUTABLE, job_env, make_job, run_train, tiny_hyperparameters


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("none", ()),
        ("tensorboard", ("tensorboard",)),
        ("TensorBoard, MLflow", ("tensorboard", "mlflow")),
        ('["mlflow", "tensorboard"]', ("mlflow", "tensorboard")),  # SDK v2 JSON-encodes a list
    ],
)
def test_report_to_accepts_one_or_several_trackers(raw, expected):
    assert TrainConfig.from_hyperparameters({"report_to": raw}).trackers == expected


def test_report_to_rejects_an_unknown_tracker():
    with pytest.raises(ConfigError, match=r"'report_to': 'wandb' names 'wandb'; expected none, tensorboard, mlflow"):
        TrainConfig.from_hyperparameters({"report_to": "wandb"})


def _job(tmp_path, environ=None):
    make_job(tmp_path, {}, {"train/faq.csv": "q,a\n"})
    return read_job({"SAGEMAKER_BASE_DIR": str(tmp_path), **(environ or {})})


def test_mlflow_without_a_tracking_uri_is_a_config_error_naming_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"report_to.*mlflow.*MLFLOW_TRACKING_URI is not set") as raised:
        tracking.check(TrainConfig(report_to="mlflow"), _job(tmp_path))
    assert raised.value.exit_code == 2


def test_tracking_settings_come_from_the_job(tmp_path):
    environ = {
        "TRAINING_JOB_NAME": "llmft-2026",
        "MLFLOW_TRACKING_URI": "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/team",
        "MLFLOW_EXPERIMENT_NAME": "faq",
    }
    settings = tracking.check(TrainConfig(report_to="tensorboard,mlflow"), _job(tmp_path, environ))
    assert settings.tensorboard_dir == tmp_path / "output" / "tensorboard"
    assert settings.run_name == "llmft-2026" and settings.mlflow_experiment_name == "faq"
    assert settings.mlflow_tracking_uri.startswith("arn:aws:sagemaker:")  # the sagemaker-mlflow plugin is installed


def test_results_metrics_flatten_the_comparison():
    table = {
        "validation": {
            "loss": {"base": 2.0, "tuned": 1.5, "delta": -0.5},
            "perplexity": {"base": None, "tuned": 4.5, "delta": None},
            "rouge_l": {"base": 0.1, "tuned": float("nan"), "delta": None},
            "exact_match": {"base": 0.0, "tuned": 0.5, "delta": 0.5},
            "count": 4,
        }
    }
    metrics = tracking.results_metrics(table, {"step": 4, "eval_loss": 1.4})
    assert metrics["ab/validation_loss_tuned"] == 1.5 and metrics["ab/validation_loss_delta"] == -0.5
    assert "ab/validation_rouge_l_tuned" not in metrics and "ab/validation_perplexity_base" not in metrics
    assert metrics["best/step"] == 4.0 and metrics["best/eval_loss"] == 1.4
    # With retrieval: the third column and the index's recall.
    rows = table["validation"]
    rows["rouge_l"] |= {"tuned_retrieval": 0.7, "delta_retrieval": 0.6}
    rows["retrieval"] = {"k": 3, "recall_at_k": 0.875, "questions_with_gold": 4}
    metrics = tracking.results_metrics(table)
    assert metrics["ab/validation_rouge_l_tuned_retrieval"] == 0.7
    assert metrics["ab/validation_rouge_l_delta_retrieval"] == 0.6
    assert metrics["ab/validation_retrieval_recall_at_k"] == 0.875


def _scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(tensorboard_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {tensorboard_dir}"
    for path in files:
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return scalars


@pytest.mark.slow
def test_tensorboard_and_mlflow_get_training_and_evaluation_metrics(
    tmp_path, tiny_model_dir, faq_csv_small, monkeypatch
):
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir, max_steps=4, save_steps=2, eval_steps=2, report_to="tensorboard,mlflow"
    )
    job = make_job(tmp_path / "job", hyperparameters, {"train/faq.csv": faq_csv_small})
    store = tmp_path / "mlruns"
    env = {
        "MLFLOW_TRACKING_URI": store.as_uri(),
        "MLFLOW_EXPERIMENT_NAME": "faq-tests",
        "TRAINING_JOB_NAME": "llmft-test-job",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps its file store only on request; a server needs none
    }
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the client below
    result = run_train(job, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    best_step = manifest["training"]["best"]["step"]

    # TensorBoard: Transformers' callback's scalars, and the A/B results at the last step.
    scalars = _scalars(job / "output" / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in scalars["eval/loss"]] == [2, 4]
    assert scalars["ab/validation_rouge_l_tuned"][0][0] == 4
    assert scalars["ab/validation_loss_base"] and scalars["ab/validation_loss_tuned"]
    assert scalars["best/step"] == [(4, float(best_step))]

    # MLflow: one run, named after the training job, with the Trainer's arguments and every metric.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("faq-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "llmft-test-job" and run.info.status == "FINISHED"
    assert manifest["tracking"] == {
        "report_to": ["tensorboard", "mlflow"],
        "tensorboard_dir": str(job / "output" / "tensorboard"),
        "mlflow_experiment_name": "faq-tests",
        "mlflow_run_id": run.info.run_id,
    }
    assert float(run.data.params["learning_rate"]) == pytest.approx(2e-3)
    assert run.data.params["eval_steps"] == "2" and run.data.params["metric_for_best_model"] == "eval_loss"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    eval_history = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [m.step for m in eval_history] == [2, 4]
    assert [m.value for m in eval_history] == pytest.approx(
        [e["eval_loss"] for e in manifest["training"]["evaluations"]]
    )
    tuned = manifest["metrics"]["validation"]["rouge_l"]["tuned"]
    assert run.data.metrics["ab/validation_rouge_l_tuned"] == pytest.approx(tuned)
    assert run.data.metrics["ab/validation_loss_tuned"] == pytest.approx(
        manifest["metrics"]["validation"]["loss"]["tuned"]
    )


@pytest.mark.slow
def test_report_to_mlflow_without_a_tracking_uri_fails_at_start(tmp_path, tiny_model_dir, faq_csv_small):
    job = make_job(tmp_path, tiny_hyperparameters(tiny_model_dir, report_to="mlflow"), {"train/faq.csv": faq_csv_small})
    result = run_train(job, env={"MLFLOW_TRACKING_URI": ""}, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    failure = (job / "output" / "failure").read_text()
    assert (
        failure.startswith("ConfigError: hyperparameter 'report_to' includes mlflow")
        and "MLFLOW_TRACKING_URI" in failure
    )
    assert not list((job / "checkpoints").glob("checkpoint-*"))


@pytest.mark.slow
def test_a_deferred_evaluation_reports_to_the_trainings_run(tmp_path, tiny_model_dir, faq_csv_small, monkeypatch):
    hyperparameters = tiny_hyperparameters(tiny_model_dir, max_steps=2, evaluation="deferred", report_to="mlflow")
    job = make_job(tmp_path / "job", hyperparameters, {"train/faq.csv": faq_csv_small})
    store = (tmp_path / "mlruns").as_uri()
    env = {"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true", "TRAINING_JOB_NAME": "deferred-job"}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    result = run_train(job, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_id = json.loads((job / "model" / "manifest.json").read_text())["tracking"]["mlflow_run_id"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("ab/")]
    evaluated = subprocess.run(
        [sys.executable, str(TRAIN_EXECUTABLE.parent / "evaluate")],
        env=job_env(job, env),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    report = json.loads((job / "output" / "data" / "eval_report.json").read_text())
    metrics = client.get_run(run_id).data.metrics
    assert metrics["ab/validation_rouge_l_tuned"] == pytest.approx(
        report["comparison"]["validation"]["rouge_l"]["tuned"]
    )
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
