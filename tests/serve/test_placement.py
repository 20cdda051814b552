"""Several GPUs: where the workers go (serve.placement), their slots, and /ping for the whole server
(serve.readiness). All on CPU: the GPU list, memory sizes and model sizes are given."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from serve import create_app, placement
from serve.config import ConfigError, ServeConfig, WorkerSlot
from serve.placement import Gpu, Plan
from serve.readiness import Problem, ReadyBoard

GIB = 1024**3
CONF = Path(__file__).resolve().parents[2] / "containers" / "serve" / "gunicorn.conf.py"
SMI = "0, GPU-aaaa-1111, 81559\n1, GPU-bbbb-2222, 81559\n2, GPU-cccc-3333, 40960\n"


def gpus(*memory_gib: float | None) -> list[Gpu]:
    return [Gpu(f"GPU-{i}", None if m is None else int(m * GIB)) for i, m in enumerate(memory_gib)]


# ----- the GPUs this server may use -----


def test_nvidia_smi_lists_the_gpus_by_uuid_with_their_memory():
    assert placement.visible_gpus({}, lambda: SMI) == [
        Gpu("GPU-aaaa-1111", 81559 * 1024**2),
        Gpu("GPU-bbbb-2222", 81559 * 1024**2),
        Gpu("GPU-cccc-3333", 40960 * 1024**2),
    ]


@pytest.mark.parametrize(
    ("cuda_visible_devices", "expected"),
    [
        ("2,0", [Gpu("2", 40960 * 1024**2), Gpu("0", 81559 * 1024**2)]),  # kept as written, in its order
        ("GPU-bbbb", [Gpu("GPU-bbbb", 81559 * 1024**2)]),  # a UUID prefix, as CUDA takes it
        ("0,7,1", [Gpu("0", 81559 * 1024**2)]),  # as in CUDA: the list ends at a device that does not exist
        ("", []),
        ("-1", []),
        ("MIG-1234", [Gpu("MIG-1234", None)]),  # a MIG device: visible, its size unknown
    ],
)
def test_cuda_visible_devices_narrows_the_list(cuda_visible_devices, expected):
    assert placement.visible_gpus({"CUDA_VISIBLE_DEVICES": cuda_visible_devices}, lambda: SMI) == expected


@pytest.mark.parametrize("output", [None, "", "No devices were found\n"])
def test_no_nvidia_smi_or_no_driver_means_no_gpu(output):
    assert placement.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, lambda: output) == []


def test_nvidia_smi_missing_from_path_is_no_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert placement.nvidia_smi() is None


# ----- the model's size on a GPU -----


def _write_weights(directory: Path, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}, directory / "model.safetensors"
    )
    return directory


def test_weight_bytes_come_from_the_safetensors_headers(tmp_path):
    model = _write_weights(tmp_path / "m", torch.float32, {"a": (1000, 10), "b": (10,)})
    (model / "config.json").write_text("{}")
    # auto serves 16-bit on a GPU (an fp32 artifact in bf16); float32 keeps 4 bytes an element.
    assert placement.weight_bytes(model, "auto") == 10010 * 2
    assert placement.weight_bytes(model, "bfloat16") == 10010 * 2
    assert placement.weight_bytes(model, "float32") == 10010 * 4
    save_file({"q": torch.zeros(100, dtype=torch.int8)}, model / "model-00002.safetensors")  # kept as stored
    assert placement.weight_bytes(model, "auto") == 10010 * 2 + 100


def test_weight_bytes_of_a_lora_adapter_count_its_local_base(tmp_path):
    base = _write_weights(tmp_path / "base", torch.bfloat16, {"w": (500, 4)})
    adapter = _write_weights(tmp_path / "adapter", torch.float32, {"lora_A": (8, 4)})
    (adapter / "model.safetensors").rename(adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    assert placement.weight_bytes(adapter, "auto") == (2000 + 32) * 2
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/hub-model"}))
    assert placement.weight_bytes(adapter, "auto") is None


def test_weight_bytes_unknown_without_readable_safetensors(tmp_path):
    assert placement.weight_bytes(tmp_path, "auto") is None
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    assert placement.weight_bytes(tmp_path, "auto") is None


# ----- the decision -----


@pytest.mark.parametrize(
    ("setting", "workers", "visible", "weights_gib", "kind", "expected_workers"),
    [
        ("auto", 1, gpus(), 1, "shared", 1),  # CPU: as before
        ("auto", 3, gpus(), 1, "shared", 3),
        ("auto", 2, gpus(80), 100, "shared", 2),  # one GPU: as before, whatever the size
        ("auto", 1, gpus(80, 80), 6, "per_gpu", 2),  # 3B model in bf16: one worker per GPU
        ("auto", 4, gpus(80, 80, 80, 80), 14, "per_gpu", 4),
        ("auto", 1, gpus(80, 80), 55, "per_gpu", 2),  # under 70 % of 80 GiB: still fits
        ("auto", 1, gpus(80, 80), 57, "device_map", 1),  # KV cache headroom gone: spread it
        ("auto", 1, gpus(80, 40), 40, "device_map", 1),  # the smallest GPU decides
        ("auto", 1, gpus(24, 24, 24, 24), 130, "device_map", 1),  # 70B in bf16 on 4 x 24 GiB: spills to CPU
        ("auto", 1, gpus(80, 80), None, "per_gpu", 2),  # size unknown: assumed to fit
        ("auto", 1, gpus(None, None), 100, "per_gpu", 2),  # GPU memory unknown: the same
        ("per_gpu", 2, gpus(80, 80, 80), 500, "per_gpu", 3),  # told: whatever the size
        ("per_gpu", 1, gpus(80), None, "per_gpu", 1),
        ("device_map", 4, gpus(80, 80), 1, "device_map", 1),
        ("device_map", 1, gpus(80), 1, "device_map", 1),
    ],
)
def test_choose(setting, workers, visible, weights_gib, kind, expected_workers):
    weights = None if weights_gib is None else int(weights_gib * GIB)
    plan = placement.choose(setting, workers, visible, weights)
    assert (plan.kind, plan.workers) == (kind, expected_workers), plan.reason
    assert plan.gpus == tuple(visible)


def test_choose_says_why():
    assert "do not fit one GPU" in placement.choose("auto", 1, gpus(24, 24), int(20 * GIB)).reason
    assert "CPU memory" in placement.choose("auto", 1, gpus(24, 24), int(40 * GIB)).reason
    ignored = placement.choose("auto", 4, gpus(80, 80), int(GIB)).reason
    assert "SAGEMAKER_MODEL_SERVER_WORKERS=4 does not apply" in ignored


@pytest.mark.parametrize("setting", ["per_gpu", "device_map"])
def test_a_gpu_placement_without_a_gpu_is_a_config_error(setting):
    with pytest.raises(ConfigError, match=f"SERVE_GPU_PLACEMENT={setting} needs a GPU"):
        placement.choose(setting, 1, [], None)


def test_plan_for_reads_the_model_only_when_it_decides(tmp_path):
    model = _write_weights(tmp_path, torch.float32, {"w": (1000,)})
    config = ServeConfig(model_dir=model)
    assert placement.plan_for(config, gpus=[]).kind == "shared"
    assert placement.plan_for(config, gpus=gpus(0.000001, 0.000001)).kind == "device_map"  # 2000 bytes > 70 %
    assert placement.plan_for(config, gpus=gpus(1, 1)).kind == "per_gpu"


# ----- what each worker is told -----


def test_each_per_gpu_worker_sees_only_its_own_gpu():
    plan = Plan("per_gpu", 2, (Gpu("GPU-a", None), Gpu("GPU-b", None)), "")
    assert plan.worker_env(0) == {
        "CUDA_VISIBLE_DEVICES": "GPU-a",
        "SERVE_GPU_PLACEMENT": "per_gpu",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
    }
    assert plan.worker_env(1)["CUDA_VISIBLE_DEVICES"] == "GPU-b"


def test_device_map_and_shared_workers_keep_every_device():
    spread = Plan("device_map", 1, (Gpu("GPU-a", None), Gpu("GPU-b", None)), "").worker_env(0)
    assert spread == {"SERVE_GPU_PLACEMENT": "device_map", "SAGEMAKER_MODEL_SERVER_WORKERS": "1"}
    assert Plan("shared", 3, (), "").worker_env(2) == {"SAGEMAKER_MODEL_SERVER_WORKERS": "3"}


@pytest.mark.parametrize(
    ("slots", "held", "slot"),
    [
        (2, [], 0),
        (2, [0], 1),
        (4, [0, 1, 3], 2),  # worker 2 died: its replacement takes its slot
        (2, [1], 0),
        (2, [0, 1], 0),  # a reload runs old and new workers side by side: the least shared slot
        (2, [0, 1, 0], 1),
    ],
)
def test_claim_slot(slots, held, slot):
    assert placement.claim_slot(slots, held) == slot


def test_worker_slot_round_trips_through_env_and_is_not_an_unknown_setting(tmp_path):
    slot = WorkerSlot(1, 2, tmp_path)
    assert WorkerSlot.from_env(slot.env()) == slot
    assert WorkerSlot.from_env({}) is None
    ServeConfig.from_env({**slot.env(), "SERVE_GPU_PLACEMENT": "per_gpu"})  # no "unknown setting"
    with pytest.raises(ConfigError, match="not a slot"):
        WorkerSlot.from_env({**slot.env(), "SERVE_WORKER_SLOT": "2"})


def test_serve_gpu_placement_is_checked():
    assert ServeConfig.from_env({}).gpu_placement == "auto"
    assert ServeConfig.from_env({"SERVE_GPU_PLACEMENT": "device_map"}).gpu_placement == "device_map"
    with pytest.raises(ConfigError, match="SERVE_GPU_PLACEMENT must be one of auto, per_gpu, device_map"):
        ServeConfig.from_env({"SERVE_GPU_PLACEMENT": "tensor_parallel"})


# ----- gunicorn.conf.py's hooks, with a fake nvidia-smi and fake gunicorn objects -----


def _fake_nvidia_smi(directory: Path, listing: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{listing}'\n")
    script.chmod(0o755)
    return directory


def _isolated_env(monkeypatch, tmp_path, **env):
    for name in list(os.environ):
        if name.startswith(("SERVE_", "SAGEMAKER_")) or name == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(name)
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_gunicorn_hooks_pin_each_worker_and_reuse_a_dead_workers_slot(monkeypatch, tmp_path):
    bin_dir = _fake_nvidia_smi(tmp_path / "bin", r"0, GPU-fake-0, 81559\n1, GPU-fake-1, 81559\n")
    _isolated_env(monkeypatch, tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    conf = runpy.run_path(str(CONF))
    assert conf["workers"] == 2  # no model to measure: assumed to fit, one worker per GPU
    log = SimpleNamespace(info=lambda *args: None)
    server = SimpleNamespace(WORKERS={}, log=log)
    conf["on_starting"](server)
    try:

        def spawn(pid):
            worker = SimpleNamespace(pid=pid)
            conf["pre_fork"](server, worker)
            server.WORKERS[pid] = worker
            with monkeypatch.context() as child:  # post_fork runs in the child: its env is its own
                child.setattr(os, "environ", dict(os.environ))
                conf["post_fork"](server, worker)
                return worker, WorkerSlot.from_env(), os.environ["CUDA_VISIBLE_DEVICES"]

        # The second "worker" has this process's pid, as it would have written its own slot's file.
        (_, slot0, gpu0), (dead, slot1, gpu1) = spawn(100), spawn(os.getpid())
        assert (slot0.index, slot1.index, gpu0, gpu1) == (0, 1, "GPU-fake-0", "GPU-fake-1")
        board = ReadyBoard(slot0.ready_dir, slot0.slots)
        board.mark(0, "ready", None)
        board.mark(1, "ready", None)
        assert board.problem() is None

        del server.WORKERS[dead.pid]  # what gunicorn's master does when it reaps a worker
        conf["child_exit"](server, dead)
        assert board.problem().error_type == "not_ready"
        _, replacement, gpu = spawn(102)
        assert (replacement.index, gpu) == (1, "GPU-fake-1")
    finally:
        conf["on_exit"](server)
    assert not slot0.ready_dir.exists()


def test_the_gunicorn_master_never_imports_torch(tmp_path):
    """CUDA initialised in the master breaks it in every forked worker: the config must not even import torch."""
    bin_dir = _fake_nvidia_smi(tmp_path / "bin", r"0, GPU-fake-0, 81559\n1, GPU-fake-1, 81559\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "SAGEMAKER_", "CUDA_VISIBLE_DEVICES"))}
    env.update(SAGEMAKER_BASE_DIR=str(tmp_path), PATH=f"{bin_dir}:{env['PATH']}")
    code = (
        "import runpy, sys; conf = runpy.run_path(sys.argv[1]); "
        "assert conf['workers'] == 2, conf['workers']; assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code, str(CONF)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ----- /ping for the whole server -----


class _ServingPredictor:
    """A worker whose own model serves."""

    def __init__(self, config):
        self.config, self.state, self.reason, self.model_name = config, "ready", None, "fake"

    def health(self):
        return None


def test_ping_is_200_only_when_every_worker_serves(tmp_path):
    board = ReadyBoard(tmp_path, 3)
    client = create_app(ServeConfig(model_dir=tmp_path), _ServingPredictor(None), ready_board=board).test_client()
    board.mark(0, "ready", None)
    response = client.get("/ping")
    assert response.status_code == 503
    assert response.get_json() == {"error": "the model is loading in 2 of 3 workers", "error_type": "not_ready"}

    board.mark(1, "ready", None)
    board.mark(2, "failed", "the model failed to load: ArtifactError: no model")
    response = client.get("/ping")
    assert response.status_code == 503
    assert response.get_json()["error_type"] == "unhealthy"
    assert response.get_json()["error"] == "worker 3 of 3: the model failed to load: ArtifactError: no model"

    board.mark(2, "ready", None)
    assert client.get("/ping").status_code == 200
    board.mark(1, "ready", "the generation engine's thread is not running")  # another worker's engine broke
    assert client.get("/ping").get_json()["error"] == "worker 2 of 3: the generation engine's thread is not running"


def test_a_slot_is_loading_again_once_its_worker_exits(tmp_path):
    board = ReadyBoard(tmp_path, 1)
    board.mark(0, "ready", None)
    board.clear(0, pid=os.getpid() + 1)  # another worker's exit: not this slot's current worker
    assert board.problem() is None
    board.clear(0, pid=os.getpid())
    assert board.problem() == Problem("not_ready", "the model is loading in 1 of 1 workers")


def test_a_worker_publishes_its_health_as_it_changes(tmp_path):
    board = ReadyBoard(tmp_path, 1)
    states = iter([("loading", "the model is loading"), ("ready", None)])
    current = [next(states)]
    board.publish(0, lambda: current[0])
    deadline = time.monotonic() + 5
    while board._read(0) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert board.problem().error_type == "not_ready"
    current[0] = next(states)
    while board.problem() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert board.problem() is None
    assert board._read(0)["pid"] == os.getpid()
