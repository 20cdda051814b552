#!/usr/bin/env python3
"""Which build of torch `make venv` installs: CPU on a machine without an NVIDIA GPU, CUDA where there is one.

    python3 scripts/torch_variant.py            # prints the pip arguments, e.g.  torch==2.13.0+cpu --index-url ...
    TORCH_VARIANT=cpu|cuda|auto                 # override the detection (default auto)
    TORCH_INDEX_URL=https://...                 # install from this index instead (e.g. a CUDA 12.6 or a mirror)

PyPI's Linux wheel of torch is the CUDA build (several GB, with its CUDA libraries); the CPU build lives on
PyTorch's own index under the local version `+cpu`. Pinning `+cpu` makes the choice explicit, so a CPU
machine never falls back to the CUDA wheel. A `+cpu` wheel already on this machine (in pip's find-links) is
used as it is, with no index: machines that ship the wheel on disk install offline. Stdlib only: this runs
before the venv has anything in it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TORCH_VERSION = "2.13.0"
CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
VARIANTS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Machine:
    system: str  # platform.system(): Linux, Darwin, Windows
    has_nvidia_gpu: bool
    local_cpu_wheel: bool  # a torch-<version>+cpu wheel sits in one of pip's find-links folders


def pip_arguments(
    machine: Machine, variant: str = "auto", index_url: str = "", version: str = TORCH_VERSION
) -> list[str]:
    """The `pip install` arguments for torch on this machine; ValueError names a bad TORCH_VARIANT."""
    variant = (variant or "auto").strip().lower()
    if variant not in VARIANTS:
        raise ValueError(f"TORCH_VARIANT={variant!r} is not one of {', '.join(VARIANTS)}")
    if variant == "auto":
        variant = "cuda" if machine.has_nvidia_gpu else "cpu"
    if machine.system != "Linux":
        # macOS and Windows wheels on PyPI are CPU builds already (Metal on macOS); there is no `+cpu` there.
        return [f"torch=={version}", *(["--index-url", index_url] if index_url else [])]
    if variant == "cuda":
        return [f"torch=={version}", *(["--index-url", index_url] if index_url else [])]
    if index_url:
        return [f"torch=={version}+cpu", "--index-url", index_url]
    if machine.local_cpu_wheel:
        return [f"torch=={version}+cpu"]
    # --extra-index-url, not --index-url: the rest of torch's dependencies still come from the default index.
    return [f"torch=={version}+cpu", "--extra-index-url", CPU_INDEX_URL]


def has_nvidia_gpu() -> bool:
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def find_links_dirs(python: str) -> list[Path]:
    """pip's find-links folders, from its environment variable and its configuration files."""
    values = [os.environ.get("PIP_FIND_LINKS", "")]
    try:
        config = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
        values += [
            line.split("=", 1)[1].strip("'\"")
            for line in config.stdout.splitlines()
            if line.split("=", 1)[0].endswith("find-links")
        ]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return [Path(p.removeprefix("file://")) for value in values for p in value.split() if p]


def has_local_cpu_wheel(dirs: list[Path], version: str = TORCH_VERSION) -> bool:
    return any(d.is_dir() and any(d.glob(f"torch-{version}+cpu-*.whl")) for d in dirs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    python = argv[0] if argv else sys.executable
    machine = Machine(platform.system(), has_nvidia_gpu(), has_local_cpu_wheel(find_links_dirs(python)))
    try:
        arguments = pip_arguments(
            machine, os.environ.get("TORCH_VARIANT", "auto"), os.environ.get("TORCH_INDEX_URL", "")
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
