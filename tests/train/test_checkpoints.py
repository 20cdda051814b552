"""Which checkpoint a job resumes from, and what loading it may run: trainer.checkpoints, without training."""

from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch
from trainer import checkpoints
from trainer.checkpoints import COMPLETE_MARKER, last_complete_checkpoint, mark_complete, refuse_unsafe_pickles
from trainer.errors import CheckpointError

from .conftest import plant_pickle


def _checkpoint(root, step: int, *, marked: bool = True, ranks: int = 2):
    """A checkpoint-<step> shaped like a 2-process DeepSpeed save: weights, each rank's shard and RNG state,
    trainer_state.json; marked complete unless `marked` is false."""
    path = root / f"checkpoint-{step}"
    (path / f"global_step{step}").mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"\x01" * 64)
    for rank in range(ranks):
        torch.save({"optimizer": torch.ones(3)}, path / f"global_step{step}" / f"zero_pp_rank_{rank}_optim_states.pt")
        torch.save({"cpu": torch.random.get_rng_state()}, path / f"rng_state_{rank}.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marked:
        mark_complete(path, step)
    return path


def test_a_checkpoint_with_its_trainer_state_but_no_marker_is_not_resumed_from(tmp_path, caplog):
    """Torn after trainer_state.json, before the marker: under several processes, rank 0 writes trainer_state.json
    while another rank may still be writing its RNG state, so the Trainer's last file proves nothing."""
    _checkpoint(tmp_path, 2)
    torn = _checkpoint(tmp_path, 4, marked=False)
    (torn / "rng_state_1.pth").unlink()  # rank 1 had not got there yet
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert f"skipping incomplete checkpoint {torn}" in caplog.text


@pytest.mark.parametrize("damage", ["cut short", "missing"])
def test_a_marked_checkpoint_that_lost_part_of_a_file_is_not_resumed_from(tmp_path, caplog, damage):
    """A copy of the directory (SageMaker's S3 sync, a restore) can carry the marker without a file listed in it."""
    _checkpoint(tmp_path, 2)
    damaged = _checkpoint(tmp_path, 4)
    shard = damaged / "global_step4" / "zero_pp_rank_1_optim_states.pt"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "global_step4/zero_pp_rank_1_optim_states.pt" in caplog.text


def test_the_marker_lists_every_file_of_every_rank_and_nothing_else(tmp_path):
    path = _checkpoint(tmp_path, 6)
    listed = json.loads((path / COMPLETE_MARKER).read_text())
    assert listed["global_step"] == 6
    assert sorted(listed["files"]) == sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER
    )
    assert listed["files"]["rng_state_1.pth"] == (path / "rng_state_1.pth").stat().st_size
    assert not list(path.glob(f".{COMPLETE_MARKER}*"))  # the temporary file was renamed
    assert last_complete_checkpoint(tmp_path) == str(path)
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_the_trainers_and_deepspeeds_own_states_pass_the_check(tmp_path):
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "checkpoint-2"
    (path / "global_step2").mkdir(parents=True)
    torch.save({"numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, path / "rng_state.pth")
    torch.save(
        {
            "zero_stage": ZeroStageEnum.gradients,
            "loss_scaler": LossScaler(1.0),
            "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
            "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(4)}}},
        },
        path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    refuse_unsafe_pickles(path, deepspeed=True)
    with checkpoints.weights_only_loading(deepspeed=True):  # and they load, weights only
        loaded = torch.load(path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0


def test_a_pickle_that_would_run_code_is_refused_before_anything_is_loaded(tmp_path):
    path = _checkpoint(tmp_path, 2)
    marker = tmp_path / "pwned"
    plant_pickle(path / "global_step2" / "zero_pp_rank_1_optim_states.pt", marker)
    plant_pickle(path / "optimizer.pt", marker)
    with (path / "scheduler.pt").open("wb") as f:  # torch.save's pre-zip format: no way to read it without running it
        torch.save({"last_epoch": 2}, f, _use_new_zipfile_serialization=False)
    plant_pickle(path / "training_args.bin", marker)  # never loaded by a resume: not the resume's business

    with pytest.raises(CheckpointError) as refused:
        refuse_unsafe_pickles(path, deepspeed=True)
    message = str(refused.value)
    assert f"refusing to resume from {path}" in message
    trap = "(builtins.getattr, pathlib.Path, pathlib.PosixPath)"  # getattr(Path, "touch")(PosixPath(marker))
    assert f"global_step2/zero_pp_rank_1_optim_states.pt {trap}" in message
    assert f"optimizer.pt {trap}" in message
    assert "scheduler.pt (not a torch.save archive" in message
    assert "training_args.bin" not in message and "rng_state" not in message
    assert "Remove that checkpoint directory" in message
    assert not marker.exists()


def test_deepspeeds_checkpoint_engine_loads_weights_only_while_resuming(tmp_path):
    """DeepSpeed's engine calls torch.load(weights_only=False): outside the guard the planted pickle runs; inside
    it is refused, and the guard leaves the environment as it found it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = TorchCheckpointEngine()
    guarded, unguarded = tmp_path / "guarded", tmp_path / "unguarded"
    plant_pickle(tmp_path / "guarded.pt", guarded)
    plant_pickle(tmp_path / "unguarded.pt", unguarded)

    with checkpoints.weights_only_loading(deepspeed=True), pytest.raises(pickle.UnpicklingError):
        engine.load(str(tmp_path / "guarded.pt"))
    assert not guarded.exists()
    assert checkpoints.FORCE_WEIGHTS_ONLY not in os.environ

    engine.load(str(tmp_path / "unguarded.pt"))  # what DeepSpeed does on its own: the trap runs
    assert unguarded.exists()
