"""`make venv`'s choice of torch build: CPU without an NVIDIA GPU, CUDA with one, overrides honoured."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("torch_variant", REPO / "scripts" / "torch_variant.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tv = load_script()
V = tv.TORCH_VERSION
LINUX_CPU = tv.Machine("Linux", has_nvidia_gpu=False, local_cpu_wheel=False)
LINUX_GPU = tv.Machine("Linux", has_nvidia_gpu=True, local_cpu_wheel=False)
LINUX_CPU_WHEEL_ON_DISK = tv.Machine("Linux", has_nvidia_gpu=False, local_cpu_wheel=True)


@pytest.mark.parametrize(
    ("machine", "variant", "index_url", "expected"),
    [
        # A laptop with no NVIDIA GPU: the CPU build from PyTorch's index, never PyPI's CUDA wheel.
        (LINUX_CPU, "auto", "", [f"torch=={V}+cpu", "--extra-index-url", tv.CPU_INDEX_URL]),
        # A GPU machine: PyPI's default Linux wheel, which is the CUDA build.
        (LINUX_GPU, "auto", "", [f"torch=={V}"]),
        # A machine that ships the CPU wheel on disk installs it offline, with no index.
        (LINUX_CPU_WHEEL_ON_DISK, "auto", "", [f"torch=={V}+cpu"]),
        # Overrides win over the detection, in any case.
        (LINUX_GPU, "CPU", "", [f"torch=={V}+cpu", "--extra-index-url", tv.CPU_INDEX_URL]),
        (LINUX_CPU, "cuda", "", [f"torch=={V}"]),
        (
            LINUX_CPU,
            "cuda",
            "https://example.test/whl/cu126",
            [f"torch=={V}", "--index-url", "https://example.test/whl/cu126"],
        ),
        (LINUX_CPU, "auto", "https://mirror.test/cpu", [f"torch=={V}+cpu", "--index-url", "https://mirror.test/cpu"]),
        # macOS has no `+cpu` build: PyPI's wheel is the CPU one.
        (tv.Machine("Darwin", False, False), "auto", "", [f"torch=={V}"]),
    ],
)
def test_pip_arguments(machine, variant, index_url, expected):
    assert tv.pip_arguments(machine, variant, index_url) == expected


def test_an_unknown_variant_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"TORCH_VARIANT='rocm' is not one of auto, cpu, cuda"):
        tv.pip_arguments(LINUX_CPU, "rocm")


def test_main_exits_2_on_a_bad_variant(monkeypatch, capsys):
    monkeypatch.setenv("TORCH_VARIANT", "tpu")
    monkeypatch.setattr(tv, "has_nvidia_gpu", lambda: False)
    assert tv.main(["python3"]) == 2
    assert "TORCH_VARIANT='tpu'" in capsys.readouterr().err


def test_a_local_cpu_wheel_is_found_in_find_links(tmp_path, monkeypatch):
    (tmp_path / f"torch-{V}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert tv.has_local_cpu_wheel([tmp_path / "missing", tmp_path])
    assert not tv.has_local_cpu_wheel([tmp_path], version="0.0.1")
    monkeypatch.setenv("PIP_FIND_LINKS", f"file://{tmp_path} /elsewhere")
    assert tmp_path in tv.find_links_dirs("/nonexistent/python")
