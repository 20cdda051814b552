"""Supply chain, checked without Docker or the network: every deployable has a hashed lock that pins what its
requirements file pins, the images install from those locks only (`--require-hashes`, no unhashed build
environments), and the default base images are pinned by digest.

The locks are made by `make lock` (docker/lock.sh, `uv pip compile --generate-hashes`); the Docker tier builds
the images from them for real (tests/docker).
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]

# requirements file -> (its lock, pins deliberately left out of the lock because the image never installs them)
LOCKS = {
    "containers/train/requirements.txt": ("containers/train/requirements.lock", ()),
    "containers/train/requirements-nodeps.txt": ("containers/train/requirements-nodeps.lock", ()),
    "containers/serve/requirements.txt": ("containers/serve/requirements.lock", ()),
    "lambda/requirements.txt": ("lambda/requirements.lock", ()),
    "local/requirements.txt": ("local/requirements.lock", ("selenium",)),  # browser tests, on the host only
}
# Each image, and the locks its Dockerfile must install.
IMAGES = {
    "containers/train/Dockerfile": ("requirements.lock", "requirements-nodeps.lock"),
    "containers/serve/Dockerfile": ("requirements.lock",),
    "local/Dockerfile": ("requirements.lock",),
}
# The images' target (docker/lock.sh): Linux x86_64, CPython 3.11.
TARGET = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# What the images take from their base or a wheel, never from a lock (docker/lock.sh leaves it out).
TORCH_STACK = re.compile(r"^(torch|triton|nvidia-.+|cuda-.+)$")
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")
HASH = re.compile(r"^ +--hash=sha256:[0-9a-f]{64}( \\)?$")
DIGEST_PINNED = re.compile(r"^[^@\s]+:[^@\s]+@sha256:[0-9a-f]{64}$")


def pins(requirements: str) -> dict[str, str]:
    """name -> version of every `==` pin that applies on the images' target."""
    out = {}
    for line in (REPO / requirements).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(TARGET):
            continue
        (spec,) = req.specifier  # the deployables pin exactly: one `==` each
        assert spec.operator == "==", f"{requirements}: {line} is not pinned with =="
        out[canonicalize_name(req.name)] = spec.version
    return out


def lock_entries(lock: str) -> dict[str, tuple[str, int]]:
    """name -> (version, number of sha256 hashes) of a lock; fails on anything a hashed lock must not hold."""
    entries: dict[str, tuple[str, int]] = {}
    current = None
    for n, line in enumerate((REPO / lock).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if m := ENTRY.match(line):
            current = canonicalize_name(m[1])
            assert current not in entries, f"{lock}:{n}: {current} twice"
            entries[current] = (m[2], 0)
        elif HASH.match(line) and current is not None:
            version, hashes = entries[current]
            entries[current] = (version, hashes + 1)
        else:  # an index URL, an unpinned name, a URL or path requirement, an option: none belongs in a lock
            pytest.fail(f"{lock}:{n}: unexpected line in a hashed lock: {line!r}")
    return entries


def test_every_requirements_file_of_a_deployable_has_its_lock():
    found = sorted(
        str(p.relative_to(REPO))
        for pattern in ("containers/*/requirements*.txt", "lambda/requirements*.txt", "local/requirements*.txt")
        for p in REPO.glob(pattern)
    )
    assert found == sorted(LOCKS), "a deployable's requirements file without a lock (add it to docker/lock.sh)"
    for requirements, (lock, _) in LOCKS.items():
        assert (REPO / lock).is_file(), f"{lock} missing: run `make lock`"
        assert Path(lock).parent == Path(requirements).parent


@pytest.mark.parametrize("requirements", sorted(LOCKS))
def test_the_lock_pins_exactly_what_the_requirements_pin(requirements):
    lock, left_out = LOCKS[requirements]
    entries = lock_entries(lock)
    wanted = {name: v for name, v in pins(requirements).items() if name not in left_out}
    locked = {name: version for name, (version, _) in entries.items()}
    stale = {name: (v, locked.get(name, "missing")) for name, v in wanted.items() if locked.get(name) != v}
    assert not stale, f"{lock} is stale, (requirements, lock) versions: {stale}; run `make lock`"
    for name in left_out:
        assert name in pins(requirements) and name not in entries, f"{name}: listed as left out of {lock}"


@pytest.mark.parametrize("lock", sorted(lock for lock, _ in LOCKS.values()))
def test_every_lock_entry_is_pinned_and_hashed_and_torch_stays_out(lock):
    text = (REPO / lock).read_text()
    assert text.startswith("# This file was autogenerated by uv via the following command:\n#    make lock\n"), (
        f"{lock} was not written by `make lock`"
    )
    entries = lock_entries(lock)
    assert entries
    unhashed = [name for name, (_, hashes) in entries.items() if hashes == 0]
    assert not unhashed, f"{lock}: entries without a sha256: {unhashed}"
    torch_stack = [name for name in entries if TORCH_STACK.match(name)]
    assert not torch_stack, f"{lock}: {torch_stack} come from the base image or a wheel, never from a lock"


@pytest.mark.parametrize("requirements", sorted(LOCKS))
def test_the_images_lock_check_passes_and_names_a_stale_pin(requirements, tmp_path):
    """docker/pip-install.sh --check-lock, which each image runs before installing, on the real files."""
    lock, left_out = LOCKS[requirements]
    kept = [
        line
        for line in (REPO / requirements).read_text().splitlines()
        if not any(line.lower().startswith(name) for name in left_out)
    ]
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(kept) + "\n")
    check = ["sh", str(REPO / "docker" / "pip-install.sh"), "--check-lock", str(reqs), str(REPO / lock)]
    ok = subprocess.run(check, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr

    name, version = next(iter(pins(requirements).items()))
    bumped = [re.sub(rf"(?i)^{re.escape(name)}==\S+", f"{name}=={version}.post99", line) for line in kept]
    reqs.write_text("\n".join(bumped) + "\n")
    stale = subprocess.run(check, capture_output=True, text=True)
    assert stale.returncode == 1
    assert f"{name}=={version}.post99" in stale.stderr.lower() and "make lock" in stale.stderr


def instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined, out = "", []
    for line in (REPO / dockerfile).read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        joined += line.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        if joined.strip():
            out.append(" ".join(joined.split()))
        joined = ""
    return out


def pip_commands(run: str) -> list[str]:
    """Each `sh /tmp/pip-install.sh ...` command of a RUN, up to its `&&`, `;` or the end."""
    return [c.strip() for c in re.findall(r"\bsh /tmp/pip-install\.sh (.+?)(?:&&|;|$)", run)]


LLAMA_CPP_WHEEL = ["--no-deps", "/tmp/wheelhouse/llama_cpp_python-*.whl"]


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_the_images_install_only_from_hashed_locks(dockerfile):
    runs = [i for i in instructions(dockerfile) if i.startswith("RUN ")]
    commands = [c for run in runs for c in pip_commands(run)]
    assert commands
    assert not any(re.search(r"\bpip3? install\b", run) for run in runs), "pip runs only through pip-install.sh"
    checked, installed = [], []
    for command in commands:
        args = command.split()
        if args[0] == "--check-lock":
            checked.append(Path(args[2]).name)
        elif args[:2] in (["--no-deps", "/tmp/wheelhouse/torch-*.whl"], LLAMA_CPP_WHEEL):
            continue  # a local wheel (torch; llama-cpp-python, built by make venv); its dependencies: the lock
        else:
            assert "--require-hashes" in args and "-r" in args, f"{dockerfile}: unhashed install: {command}"
            # No isolated build environment, which pip would fill from PyPI without hashes.
            assert "--only-binary" in args or "--no-build-isolation" in args, f"{dockerfile}: {command}"
            installed.append(args[args.index("-r") + 1])
    copied = [src for i in instructions(dockerfile) if i.startswith("COPY ") for src in i.split()[1:-1]]
    for lock in IMAGES[dockerfile]:
        assert lock in checked, f"{dockerfile} does not --check-lock {lock} against its requirements"
        path = str(Path(dockerfile).parent / lock)
        assert any(fnmatch.fnmatch(path, src) for src in copied), f"{dockerfile} does not COPY {path}"
    assert all(path.endswith(".lock") for path in installed), installed
    if dockerfile == "containers/train/Dockerfile":
        # The sdist-only packages are split off the lock and built after the rest; the split covers it all.
        split = next(run for run in runs if "awk" in run)
        assert "/opt/program/requirements.lock" in split
        assert {"/tmp/wheels.lock", "/tmp/sdist.lock", "/opt/program/requirements-nodeps.lock"} <= set(installed)
    else:
        assert set(installed) == {f"/{'opt/program' if 'containers' in dockerfile else 'app/local'}/requirements.lock"}


def test_the_lambda_deploys_no_unlocked_dependencies():
    # SAM packages lambda/src (CodeUri) and bundles the requirements.txt it finds there: none, so the function
    # runs on the runtime's boto3 alone, which lambda/requirements.lock pins and hashes for its tests.
    assert "CodeUri: ../lambda/src" in (REPO / "infra" / "template.yaml").read_text()
    assert not list((REPO / "lambda" / "src").rglob("requirements*.txt"))


def base_default(dockerfile: str) -> str:
    (ref,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", (REPO / dockerfile).read_text(), re.M)
    return ref


@pytest.mark.parametrize(
    "dockerfile",
    # The training image's devel base is still by tag: no registry is reachable where this was written, and no
    # public pin of its digest was found. docker/pin-bases.sh pins it where Docker Hub is reachable; then add it
    # here (docs/docker.md, "Locked").
    ["containers/serve/Dockerfile", "local/Dockerfile"],
)
def test_the_default_base_image_is_pinned_by_digest(dockerfile):
    text = (REPO / dockerfile).read_text()
    assert "FROM ${BASE_IMAGE}" in text  # CI overrides it with its local stand-in base
    assert DIGEST_PINNED.match(base_default(dockerfile)), base_default(dockerfile)


def test_pin_bases_check_agrees():
    proc = subprocess.run([str(REPO / "docker" / "pin-bases.sh"), "--check"], capture_output=True, text=True)
    all_pinned = all(DIGEST_PINNED.match(base_default(f)) for f in IMAGES)
    assert proc.returncode == (0 if all_pinned else 1), proc.stdout + proc.stderr
    for dockerfile in IMAGES:
        assert f"{dockerfile}: {base_default(dockerfile)}" in proc.stdout


def test_the_torch_images_bases_carry_the_torch_the_locks_were_resolved_against():
    (pin,) = re.findall(r"^torch==(\S+)$", (REPO / "requirements-dev.txt").read_text(), re.M)
    for dockerfile in ("containers/train/Dockerfile", "containers/serve/Dockerfile"):
        assert base_default(dockerfile).startswith(f"pytorch/pytorch:{pin}-"), dockerfile


def test_the_gguf_converter_comes_from_a_hash_pinned_sdist():
    """The training image's one download outside the locks: llama.cpp's converter, from one sdist whose sha256 the
    installer pins and checks before it extracts anything."""
    installer = (REPO / "docker" / "install_gguf_converter.py").read_text()
    assert re.search(r'^SDIST_SHA256 = "[0-9a-f]{64}"$', installer, re.M)
    assert "if digest != SDIST_SHA256:" in installer
    train = (REPO / "containers" / "train" / "Dockerfile").read_text()
    assert "python /tmp/install_gguf_converter.py" in train and "--sdist" not in train
