"""More than one process, or more than one host, as SageMaker launches them: torchrun, gloo on CPU."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest
from trainer.checkpoints import COMPLETE_MARKER, mark_complete

from .conftest import (
    TRAIN_EXECUTABLE,
    job_env,
    make_job,
    plant_pickle,
    run_train,
    set_hyperparameters,
    tiny_hyperparameters,
    train_until_sigterm,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_deepspeed_zero2(tmp_path, tiny_model_dir, faq_csv_small):
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir, deepspeed="zero2", nproc_per_node=2, per_device_batch_size=2, eval_train_samples=2
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    result = run_train(job, timeout=600, env={"SM_MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "--nproc_per_node 2" in result.stdout
    assert "[rank 1] trainer.job: training done" in result.stdout
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    assert "deepspeed" in manifest["versions"] and manifest["hyperparameters"]["deepspeed"] == "zero2"
    assert list((job / "checkpoints").glob("checkpoint-*/global_step*"))  # DeepSpeed's own checkpoint layout
    for checkpoint in (job / "checkpoints").glob("checkpoint-*"):  # each marked complete, every rank's part listed
        listed = json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"]
        assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= set(listed), listed
        assert sum(name.endswith("optim_states.pt") for name in listed) == 2, listed


def test_two_hosts_meet_on_loopback(tmp_path, tiny_model_dir, faq_csv_small):
    """Each host has its own tree and resourceconfig.json; hosts sorted, the first is the master."""
    hosts = ["127.0.0.1", "127.0.0.2"]
    port = str(free_port())
    jobs, processes = [], []
    for host in reversed(hosts):  # start the worker host first: the order must not matter
        job = make_job(
            tmp_path / host,
            tiny_hyperparameters(tiny_model_dir, per_device_batch_size=2, eval_train_samples=2),
            {"train/faq.csv": faq_csv_small},
            resource_config={"current_host": host, "hosts": list(reversed(hosts)), "network_interface_name": "lo"},
        )
        jobs.append(job)
        processes.append(
            subprocess.Popen(
                [sys.executable, str(TRAIN_EXECUTABLE)],
                env=job_env(job, {"SM_MASTER_PORT": port}),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    worker, master = jobs
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "--node_rank 1 --master_addr 127.0.0.1" in outputs[0]
    assert "--node_rank 0 --master_addr 127.0.0.1" in outputs[1]
    assert (master / "model" / "manifest.json").exists()
    assert not (worker / "model" / "manifest.json").exists()  # one artifact per job, from the master


def test_sigterm_reaches_every_worker_and_the_job_resumes(tmp_path, tiny_model_dir, faq_csv_small):
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir, nproc_per_node=2, max_steps=40, save_steps=100, per_device_batch_size=1, eval_train_samples=2
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    code, text, checkpoints = train_until_sigterm(job, at_step=3, env={"SM_MASTER_PORT": str(free_port())})
    assert code == 143, text[-6000:]
    assert "passing it to 2 worker process(es)" in text
    assert "[rank 0]" in text and "[rank 1]" in text and text.count("stop requested (SIGTERM)") == 2
    assert checkpoints and int(checkpoints[-1].name.split("-")[1]) < 40

    rerun = run_train(job, timeout=600, env={"SM_MASTER_PORT": str(free_port())})
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert f"resuming from {checkpoints[-1]}" in rerun.stdout
    assert json.loads((job / "model" / "manifest.json").read_text())["training"]["steps"] == 40


def test_one_process_with_deepspeed_zero3(tmp_path, tiny_model_dir, faq_csv_small):
    """A single-GPU DeepSpeed job: DeepSpeed needs a launcher's environment even for one process."""
    hyperparameters = tiny_hyperparameters(tiny_model_dir, deepspeed="zero3", max_steps=2, eval_train_samples=2)
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    result = run_train(job, timeout=600, env={"SM_MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "--nproc_per_node 1" in result.stdout
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    assert manifest["hyperparameters"]["deepspeed"] == "zero3" and manifest["training"]["steps"] == 2


def test_zero3_loads_each_rank_s_shard_only(tmp_path, tiny_model_dir, faq_csv_small):
    """TrainingArguments exist before the model loads, so from_pretrained runs under zero.Init: with 2 processes
    each rank holds about half of the parameters from the start, never a whole copy."""
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir, deepspeed="zero3", nproc_per_node=2, max_steps=1, per_device_batch_size=2, eval_train_samples=2
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    result = run_train(job, timeout=600, env={"SM_MASTER_PORT": str(free_port())})
    # Not the exit code: two ZeRO-3 processes on CPU (gloo) sometimes abort in teardown after finishing, about
    # one run in eight (docs/reliability.md, "Not done"); what this test is about is logged long before.
    assert result.stdout.count("trainer.job: training done") == 2, result.stdout[-4000:] + result.stderr[-4000:]
    held = {
        int(rank): (int(part), int(total))
        for rank, part, total in re.findall(
            r"ZeRO-3: rank (\d) holds (\d+) of the model's (\d+) parameters", result.stdout + result.stderr
        )
    }
    assert sorted(held) == [0, 1], result.stdout[-4000:]
    for part, total in held.values():
        assert 0.45 <= part / total <= 0.55, held
    assert sum(part for part, _ in held.values()) >= held[0][1]  # together they hold it all


# ZeRO-3 with one process: two on CPU abort now and then at exit (a pre-existing flake, see
# test_zero3_loads_each_rank_s_shard_only); ZeRO-2 covers the files of a second rank.
@pytest.mark.parametrize(("stage", "processes"), [("zero2", 2), ("zero3", 1)])
def test_deepspeed_resumes_weights_only_and_refuses_a_planted_pickle(
    tmp_path, tiny_model_dir, faq_csv_small, stage, processes
):
    """DeepSpeed's checkpoint engine unpickles with weights_only=False. A resume loads its real optimizer state
    anyway (weights only, its few classes allowed), and a pickle planted in the checkpoint location is refused,
    with a reason, before anything is loaded: it never runs."""
    hyperparameters = tiny_hyperparameters(
        tiny_model_dir,
        deepspeed=stage,
        nproc_per_node=processes,
        max_steps=2,
        save_steps=2,
        per_device_batch_size=1,
        eval_base_model=False,
        eval_max_samples=1,
        eval_train_samples=0,
        eval_max_new_tokens=2,
    )
    job = make_job(tmp_path, hyperparameters, {"train/faq.csv": faq_csv_small})
    first = run_train(job, timeout=600, env={"SM_MASTER_PORT": str(free_port())})
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    set_hyperparameters(job, max_steps=4)
    resumed = run_train(job, timeout=600, env={"SM_MASTER_PORT": str(free_port())})
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"resuming from {job / 'checkpoints' / 'checkpoint-2'}" in resumed.stdout
    assert json.loads((job / "model" / "manifest.json").read_text())["training"]["steps"] == 4

    marker = tmp_path / "pwned"
    shards = sorted((job / "checkpoints" / "checkpoint-4").glob("global_step4/*optim_states.pt"))
    assert len(shards) == processes, shards
    plant_pickle(shards[-1], marker)  # the last rank's optimizer state
    mark_complete(shards[-1].parents[1], 4)  # whoever can write the checkpoint can write its marker too
    set_hyperparameters(job, max_steps=6)
    refused = run_train(job, timeout=600, env={"SM_MASTER_PORT": str(free_port())})
    assert not marker.exists(), "a pickle planted in the checkpoint ran on resume"
    assert refused.returncode != 0, refused.stdout[-4000:]
    failure = (job / "output" / "failure").read_text()
    assert failure.startswith("CheckpointError: refusing to resume from"), failure[:2000]
    assert f"global_step4/{shards[-1].name} (builtins.getattr" in failure, failure[:2000]
