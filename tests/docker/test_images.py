"""The images' metadata and layout: what SageMaker and SDK local mode rely on before any code runs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.docker


def _config(docker_cli, image: str) -> dict:
    return docker_cli.inspect(image)["Config"]


def _env(config: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config["Env"])


@pytest.mark.parametrize("kind", ["train", "serve"])
def test_entry_point_is_the_bare_command_on_path(docker_cli, images, kind):
    # SageMaker runs `docker run IMAGE train|serve`; with no ENTRYPOINT the word itself is exec'd from PATH
    # as PID 1 (exec form, no shell, no tini), and ContainerEntrypoint ["train"] works the same way.
    # SDK v3 local mode passes no command at all, so CMD must be the right word.
    config = _config(docker_cli, getattr(images, kind))
    assert not config.get("Entrypoint"), config.get("Entrypoint")
    assert config["Cmd"] == [kind]
    env = _env(config)
    assert env["PATH"].split(":")[0] == "/opt/program"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert config.get("User", "") in ("", "root", "0")  # SageMaker starts its containers as root


def test_serving_image_declares_port_and_sagemaker_labels(docker_cli, images):
    config = _config(docker_cli, images.serve)
    assert "8080/tcp" in config["ExposedPorts"]
    assert config["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"


@pytest.mark.parametrize("kind", ["train", "serve"])
def test_layout_code_outside_opt_ml_and_no_caches(docker_cli, images, kind):
    # /opt/ml is mounted over by SageMaker, so nothing may live there; pip caches and build inputs
    # (wheels, the pip helper) must not be baked in; the image carries only its own deployable.
    script = (
        f'set -e; test "$(command -v {kind})" = /opt/program/{kind}; test -x /opt/program/{kind}; '
        "test ! -e /opt/ml; test ! -e /root/.cache/pip; test ! -e /tmp/wheelhouse; "
        # BuildKit < 0.12 (Docker 20.10) leaves an empty stub where a file was bind-mounted; never content.
        "test ! -s /tmp/pip-install.sh; ! ls / /opt/program | grep -qx -e tests -e local -e lambda; "
        "ls /opt/program"
    )
    proc = docker_cli.run("run", "--rm", getattr(images, kind), "sh", "-c", script, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    other = {"train": "serve", "serve": "train"}[kind]
    assert other not in proc.stdout.split(), proc.stdout


def test_serving_image_has_an_unprivileged_user(docker_cli, images):
    proc = docker_cli.run("run", "--rm", "--user", "model-server", images.serve, "id", "-u")
    assert int(proc.stdout.strip()) != 0


@pytest.mark.parametrize("kind", ["train", "serve"])
def test_code_is_layered_after_dependencies(docker_cli, images, kind):
    # A code change must not reinstall dependencies: the requirements install comes before the code COPY.
    history = docker_cli.run(
        "history", "--no-trunc", "--format", "{{.CreatedBy}}", getattr(images, kind)
    ).stdout.splitlines()[::-1]  # oldest first
    deps = max(i for i, step in enumerate(history) if "requirements.txt" in step and "pip-install" in step)
    code = max(i for i, step in enumerate(history) if f"COPY containers/{kind}/ /opt/program/" in step)
    assert deps < code, history
