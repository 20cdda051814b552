"""`make test`'s system set-up (scripts/setup-system.sh): what it runs as root, through sudo, or refuses to run.

The real install scripts need root and the network; here the driver runs on a copy of the tree whose setup.d holds
one script that reports itself missing and records how it was run, with `id`, `sudo` and `docker` stood in for
on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "scripts" / "setup.d").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup-system.sh", tmp_path / "scripts" / "setup-system.sh")
    executable(
        tmp_path / "scripts" / "setup.d" / "50-thing.sh",
        f"""#!/usr/bin/env bash
if [ "${{1:-}}" = --check ]; then [ -e "{tmp_path}/installed" ]; exit; fi
echo "uid=$(id -u) via=${{VIA:-direct}}" > "{tmp_path}/installed"
""",
    )
    (tmp_path / "bin").mkdir()
    executable(tmp_path / "bin" / "docker", "#!/bin/sh\nexit 1\n")  # no engine: the base image step is skipped
    return tmp_path


def run(tree: Path, uid: int, sudo: str | None, **env: str) -> subprocess.CompletedProcess:
    executable(tree / "bin" / "id", f"#!/bin/sh\necho {uid}\n")
    sudo_path = tree / "bin" / "sudo"
    sudo_path.unlink(missing_ok=True)
    if sudo == "works":
        executable(sudo_path, '#!/bin/sh\n[ "$1" = -n ] && shift\nexport VIA=sudo\nexec "$@"\n')
    elif sudo == "asks for a password":
        executable(sudo_path, "#!/bin/sh\necho 'sudo: a password is required' >&2\nexit 1\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "SKIP_DOCKER_TESTS")}
    # PATH holds the stand-ins and the few tools the script needs, so this machine's own sudo is never found.
    for tool in ("bash", "dirname", "true"):
        if not (tree / "bin" / tool).exists():
            (tree / "bin" / tool).symlink_to(shutil.which(tool))
    bash = tree / "bin" / "bash"
    return subprocess.run(
        [str(bash), str(tree / "scripts" / "setup-system.sh")],
        capture_output=True,
        text=True,
        env={**environ, "PATH": str(tree / "bin"), **env},
        timeout=60,
    )


def installed(tree: Path) -> str | None:
    marker = tree / "installed"
    return marker.read_text().strip() if marker.exists() else None


def test_as_root_it_installs_what_is_missing(tree):
    result = run(tree, uid=0, sudo=None)
    assert result.returncode == 0, result.stderr
    assert installed(tree) == "uid=0 via=direct"


def test_not_root_it_installs_through_passwordless_sudo(tree):
    result = run(tree, uid=1000, sudo="works")
    assert result.returncode == 0, result.stderr
    assert installed(tree) == "uid=1000 via=sudo"


@pytest.mark.parametrize("sudo", [None, "asks for a password"])
def test_not_root_without_sudo_it_stops_at_once_naming_the_command(tree, sudo):
    result = run(tree, uid=1000, sudo=sudo)
    assert result.returncode == 1
    assert "sudo scripts/setup-system.sh" in result.stderr
    assert "SKIP_DOCKER_TESTS=1 make test" in result.stderr
    assert "50-thing.sh" in result.stderr  # what is missing
    assert installed(tree) is None


def test_a_second_run_installs_nothing_and_needs_no_root(tree):
    assert run(tree, uid=0, sudo=None).returncode == 0
    (tree / "installed").write_text("first run")
    result = run(tree, uid=1000, sudo=None)
    assert result.returncode == 0, result.stderr
    assert installed(tree) == "first run"


def test_the_local_opt_out_skips_everything_but_never_in_ci(tree):
    skipped = run(tree, uid=1000, sudo=None, SKIP_DOCKER_TESTS="1")
    assert skipped.returncode == 0 and "SKIP_DOCKER_TESTS=1" in skipped.stdout
    assert installed(tree) is None
    in_ci = run(tree, uid=1000, sudo=None, SKIP_DOCKER_TESTS="1", CI="true")
    assert in_ci.returncode == 1 and "sudo scripts/setup-system.sh" in in_ci.stderr
