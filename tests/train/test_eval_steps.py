"""Evaluation during training (`eval_steps`): the validation answer loss every N steps, and the best checkpoint,
not the last step, packaged as the artifact."""

from __future__ import annotations

import json
import threading

import pytest
from trainer.config import TrainConfig
from trainer.errors import ConfigError

from .conftest import make_job, run_train, tiny_hyperparameters, train_until_sigterm


def test_save_steps_must_be_a_multiple_of_eval_steps():
    with pytest.raises(ConfigError, match=r"'save_steps': 50 must be a multiple of eval_steps=20"):
        TrainConfig.from_hyperparameters({"eval_steps": "20"})
    assert TrainConfig.from_hyperparameters({"eval_steps": "20", "load_best_model_at_end": "false"}).eval_steps == 20
    assert TrainConfig.from_hyperparameters({"eval_steps": "25"}).eval_steps == 25


def test_training_arguments_evaluate_and_keep_the_best(tmp_path):
    from trainer.training import training_arguments

    args = training_arguments(
        TrainConfig(eval_steps=5, save_steps=10, max_steps=20), tmp_path, train_rows=8, run_name="job-1"
    )
    assert (args.eval_strategy, args.eval_steps, args.metric_for_best_model) == ("steps", 5, "eval_loss")
    assert args.load_best_model_at_end and args.greater_is_better is False and args.run_name == "job-1"
    off = training_arguments(TrainConfig(max_steps=20), tmp_path, train_rows=8)
    assert off.eval_strategy == "no" and not off.load_best_model_at_end


@pytest.mark.slow
def test_eval_steps_evaluates_during_training_and_the_manifest_names_the_best(tmp_path, tiny_model_dir, faq_csv_small):
    hyperparameters = tiny_hyperparameters(tiny_model_dir, max_steps=5, save_steps=2, eval_steps=2)
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    result = run_train(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    training = json.loads((job / "model" / "manifest.json").read_text())["training"]
    evaluations = training["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 4, 5]  # every eval_steps, and the last step
    lowest = min(evaluations, key=lambda e: e["eval_loss"])
    best = training["best"]
    assert best["step"] == lowest["step"] and best["eval_loss"] == pytest.approx(lowest["eval_loss"])
    assert best["checkpoint"] == f"checkpoint-{lowest['step']}" and best["artifact_is_best"]
    assert "metrics: step=2/5 validation_answer_loss=" in result.stdout
    assert f"best validation answer loss {lowest['eval_loss']:.4f} at step {lowest['step']} of 5" in result.stdout


def spoil_after(step: int):
    """A callback that adds large noise to every trainable weight at the end of step `step` (before that step's
    own evaluation, if it has one), so that every evaluation from then on is much worse than the ones before."""
    from transformers import TrainerCallback

    class SpoilAfter(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            import torch

            if state.global_step == step:  # the step's evaluation comes after this callback
                generator = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for parameter in model.parameters():
                        if parameter.requires_grad:
                            parameter.add_(torch.randn(parameter.shape, generator=generator))
            return control

    return SpoilAfter()


@pytest.mark.slow
def test_the_best_checkpoint_not_the_last_step_is_packaged(tmp_path, tiny_model_dir, faq_csv_small, monkeypatch):
    """Spoil the weights after the first evaluation (step 2); the artifact must be that checkpoint's model: its
    weights are checkpoint-2's, and the A/B evaluation of the artifact measures the very loss that evaluation during
    training measured at step 2."""
    import torch
    from safetensors.torch import load_file
    from trainer import job as job_module
    from trainer import sagemaker, tracking
    from trainer.modeling import default_cache_dir

    hyperparameters = tiny_hyperparameters(
        tiny_model_dir,
        max_steps=6,
        save_steps=2,
        eval_steps=2,
        method="full",  # the tiny model's loss hangs on its (tied) embeddings, which LoRA leaves alone
        learning_rate=1e-4,  # small: the spoiled weights stay worse than step 2's until the end
        eval_base_model="false",
        eval_train_samples=0,
    )
    root = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small}, encode="sdk_v2")
    monkeypatch.setattr(tracking, "callbacks", lambda _tracking: [spoil_after(step=3)])
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    job = sagemaker.read_job({"SAGEMAKER_BASE_DIR": str(root)})
    config = TrainConfig.from_hyperparameters(job.hyperparameters)
    job_module.run(config, job, default_cache_dir(), threading.Event())

    manifest = json.loads((root / "model" / "manifest.json").read_text())
    training = manifest["training"]
    losses = {e["step"]: e["eval_loss"] for e in training["evaluations"]}
    assert sorted(losses) == [2, 4, 6]
    assert losses[4] > losses[2] and losses[6] > losses[2], losses
    assert training["steps"] == 6
    assert training["best"] == {
        "step": 2,
        "eval_loss": pytest.approx(losses[2]),
        "checkpoint": "checkpoint-2",
        "artifact_is_best": True,
    }
    # The A/B evaluation of the artifact on the same validation set: the loss of step 2, not of step 6.
    tuned_validation_loss = manifest["metrics"]["validation"]["loss"]["tuned"]
    assert tuned_validation_loss == pytest.approx(losses[2], rel=1e-4)

    # The artifact's weights are checkpoint-2's, not the last checkpoint's.
    artifact = load_file(root / "model" / "model.safetensors")
    best = load_file(root / "checkpoints" / "checkpoint-2" / "model.safetensors")
    last = load_file(root / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert set(artifact) == set(best)
    for name, tensor in artifact.items():
        torch.testing.assert_close(tensor, best[name], msg=name)
    assert any(not torch.equal(artifact[name], last[name]) for name in artifact)


@pytest.mark.slow
def test_a_resumed_job_keeps_the_evaluations_and_the_best_from_before(tmp_path, tiny_model_dir, faq_csv_small):
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir, max_steps=20, save_steps=2, eval_steps=2, per_device_batch_size=1, eval_train_samples=0
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    code, log, _ = train_until_sigterm(job, at_step=3)
    assert code == 143, log[-4000:]
    assert "validation_answer_loss=" in log

    rerun = run_train(job)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    training = json.loads((job / "model" / "manifest.json").read_text())["training"]
    evaluations = training["evaluations"]
    assert [e["step"] for e in evaluations] == list(range(2, 21, 2))  # the first run's come back with its state
    lowest = min(evaluations, key=lambda e: e["eval_loss"])
    assert training["best"]["step"] == lowest["step"] and training["best"]["artifact_is_best"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("stage", "processes"), [("zero2", 2), ("zero3", 2)])
def test_eval_steps_under_deepspeed_packages_the_best(tmp_path, tiny_model_dir, faq_csv_small, stage, processes):
    """Under DeepSpeed every rank evaluates its share of the validation set, the losses are summed across ranks,
    and the best checkpoint is loaded back into the engine (ZeRO-3: then gathered) before the artifact is saved."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir,
        deepspeed=stage,
        nproc_per_node=processes,
        per_device_batch_size=2,
        max_steps=4,
        save_steps=2,
        eval_steps=2,
        eval_base_model="false",
        eval_train_samples=0,
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    result = run_train(job, timeout=600, env={"SM_MASTER_PORT": str(port)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    training = manifest["training"]
    assert [e["step"] for e in training["evaluations"]] == [2, 4]
    best = training["best"]
    assert best["eval_loss"] == pytest.approx(min(e["eval_loss"] for e in training["evaluations"]))
    assert best["artifact_is_best"]
    # The artifact's own validation loss, measured by the A/B evaluation on one process: the best step's.
    assert manifest["metrics"]["validation"]["loss"]["tuned"] == pytest.approx(best["eval_loss"], rel=1e-3)
