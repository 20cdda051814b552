"""Faults in a training job, with the real `containers/train/train` and a tiny model: SIGKILL and SIGTERM at
random points (the rerun resumes from the last *complete* checkpoint and loses at most one checkpoint interval),
a checkpoint cut off mid-save (never loaded), and a full disk (a clear failure, no artifact that looks complete).
"""

from __future__ import annotations

import errno
import json
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train.conftest import TRAIN_EXECUTABLE, csv_text, faq_rows, job_env, make_job, run_train, tiny_hyperparameters
from trainer.checkpoints import COMPLETE_MARKER

pytestmark = pytest.mark.slow

MAX_STEPS, SAVE_STEPS = 9, 3


def small_job(root: Path, model_dir: Path, **overrides) -> Path:
    # Evaluation is not what these tests are about: skip the base model's and keep the rest to one question.
    settings = {
        "max_steps": MAX_STEPS,
        "save_steps": SAVE_STEPS,
        "per_device_batch_size": 1,
        "eval_base_model": False,
        "eval_max_samples": 1,
        "eval_train_samples": 0,
        "eval_max_new_tokens": 2,
        **overrides,
    }
    hyperparameters = tiny_hyperparameters(model_dir, **settings)
    return make_job(root, hyperparameters, {"train/faq.csv": csv_text(faq_rows(12), header=["question", "answer"])})


def steps_logged(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"metrics: step=(\d+)/", log)]


def complete_checkpoints(job: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1]) for p in job.glob("checkpoints/checkpoint-*") if (p / COMPLETE_MARKER).exists()
    )


def run_and_signal(job: Path, sig: int, rng: random.Random) -> tuple[int, str]:
    """Start the job, wait for a random training step, then a random fraction of a step more, and send `sig`."""
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_EXECUTABLE)],
        env=job_env(job),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    at_step = rng.randint(2, MAX_STEPS - 2)
    log = []
    for line in process.stdout:
        log.append(line)
        if line.startswith(f"metrics: step={at_step}/"):
            time.sleep(rng.uniform(0, 0.4))  # anywhere in the next step, a checkpoint save included
            process.send_signal(sig)
            break
    log.extend(process.stdout)
    return process.wait(timeout=120), "".join(log)


def test_sigkill_then_sigterm_at_random_points_then_the_job_completes(tmp_path, tiny_model_dir):
    rng = random.Random(int(time.time()))  # a new point each run; the seed is in the failure message
    seed = rng.random()
    job = small_job(tmp_path, tiny_model_dir)

    code, log = run_and_signal(job, signal.SIGKILL, rng)
    assert code == -signal.SIGKILL, log[-3000:]
    killed_after = max(steps_logged(log))
    saved = complete_checkpoints(job)
    # Work lost to a SIGKILL is at most one checkpoint interval (plus the step in flight).
    assert killed_after - (saved[-1] if saved else 0) <= SAVE_STEPS + 1, (seed, killed_after, saved)

    code, log = run_and_signal(job, signal.SIGTERM, rng)
    if code == 143:  # stopped mid-training: SIGTERM saves a checkpoint at the step it stopped at
        assert complete_checkpoints(job)[-1] >= max(steps_logged(log)), (seed, log[-3000:])
        assert (job / "output" / "failure").read_text().startswith("TrainingInterrupted")
    else:  # the signal landed after training (evaluation, writing the artifact): the job had finished
        assert code == 0, (seed, log[-3000:])

    final = run_train(job)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    manifest = json.loads((job / "model" / "manifest.json").read_text())
    assert manifest["training"]["steps"] == MAX_STEPS
    assert not (job / "output" / "failure").exists()


def test_a_checkpoint_cut_off_mid_save_is_never_loaded(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir)
    first = run_train(job)
    assert first.returncode == 0, first.stdout[-3000:]
    # What a SIGKILL during a save leaves: the step's directory, adapter weights, no optimizer or trainer state.
    last = max(complete_checkpoints(job))
    torn = job / "checkpoints" / f"checkpoint-{last + SAVE_STEPS}"
    torn.mkdir()
    shutil.copy(job / "checkpoints" / f"checkpoint-{last}" / "adapter_config.json", torn)
    (torn / "adapter_model.safetensors").write_bytes(b"\x00" * 100)  # truncated
    weights = (job / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(job / "model")  # as if the job had been killed while it evaluated or wrote the artifact

    rerun = run_train(job, env=None)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from {job / 'checkpoints' / f'checkpoint-{last}'}" in rerun.stdout
    assert f"skipping incomplete checkpoint {torn}" in rerun.stdout + rerun.stderr
    # checkpoint-9 is at max_steps, in the middle of an epoch: transformers would train a 10th step; the job
    # loads the finished state instead, and writes the same model as the first run.
    assert last == MAX_STEPS
    assert "training is complete, loading it" in rerun.stdout + rerun.stderr
    assert json.loads((job / "model" / "manifest.json").read_text())["training"]["steps"] == MAX_STEPS
    assert (job / "model" / "model.safetensors").read_bytes() == weights


UNSHARE_PREFIXES = (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"])
FILE_SIZE_LIMIT = 64 * 1024  # bytes; the tiny model's weights alone are ~107 KiB


def _tmpfs_namespace() -> tuple[list[str] | None, str]:
    """How to mount a private tmpfs here: with a user namespace (no root needed), else as root in a mount namespace
    of its own; or None and why not (Ubuntu 24.04's AppArmor restricts user namespaces, containers without
    CAP_SYS_ADMIN refuse both)."""
    if shutil.which("unshare") is None:
        return None, "no unshare command"
    errors = []
    for prefix in UNSHARE_PREFIXES:
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
        if probe.returncode == 0:
            return prefix, ""
        errors.append(f"{' '.join(prefix)}: {probe.stderr.decode(errors='replace').strip() or probe.returncode}")
    return None, "cannot mount a private tmpfs (" + "; ".join(errors) + ")"


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


@pytest.mark.parametrize("disk", ["tmpfs", "file-size-limit"])
def test_a_full_disk_fails_clearly_and_leaves_no_artifact_that_looks_complete(tmp_path, tiny_model_dir, disk):
    """Writing the artifact's weights fails in the kernel, part-way through the file.

    `tmpfs`: the model directory is a 64 KiB tmpfs mounted in a private mount namespace: a real ENOSPC. Where no
    such namespace is allowed, it is skipped with the reason in pytest's summary, and the other case still runs.
    `file-size-limit`: an RLIMIT_FSIZE of 64 KiB on the job's process, so that any file it writes stops at 64 KiB
    and the weights' write fails with EFBIG (Python ignores SIGXFSZ); no privileges needed, it runs wherever Linux
    does. The LoRA is kept small so that the weights are the first file to outgrow the limit."""
    job = small_job(
        tmp_path,
        tiny_model_dir,
        max_steps=2,
        save_steps=100,
        lora_r=1,
        lora_target_modules="q_proj",
        lora_train_token_embeddings="false",
    )
    model_dir, listing = job / "model", tmp_path / "model-dir-after.txt"
    model_dir.mkdir()
    command, limit = [sys.executable, str(TRAIN_EXECUTABLE)], None
    if disk == "tmpfs":
        prefix, refused = _tmpfs_namespace()
        if prefix is None:
            pytest.skip(refused)
        script = 'mount -t tmpfs -o size=64k tmpfs "$1" || exit 99\n"$2" "$3"; code=$?\nls -A "$1" > "$4"\nexit $code\n'
        command = [*prefix, "sh", "-c", script, "sh", str(model_dir), *command, str(listing)]
    else:
        limit = _limit_file_size

    result = subprocess.run(command, env=job_env(job), capture_output=True, text=True, timeout=240, preexec_fn=limit)
    assert result.returncode not in (0, 99), result.stdout[-2000:] + result.stderr[-2000:]
    assert "training done" in result.stdout, result.stdout[-2000:]  # it failed at the artifact, not before
    failure = (job / "output" / "failure").read_text()
    reason, number = {
        "tmpfs": ("No space left on device", errno.ENOSPC),
        "file-size-limit": ("File too large", errno.EFBIG),
    }[disk]
    assert reason in failure or f"Errno {number}" in failure or f"os error {number}" in failure, failure[:2000]
    left = listing.read_text().split() if disk == "tmpfs" else [p.name for p in model_dir.iterdir()]
    assert "manifest.json" not in left, f"an artifact without its weights must not look complete: {left}"
    assert "model.safetensors" not in left, f"half-written weights were moved into the model directory: {left}"
