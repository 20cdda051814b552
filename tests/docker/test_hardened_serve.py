"""The serving image run the way a hardened platform runs it (reliability review, docs/reliability.md): an
unprivileged user, a read-only root filesystem and model, no Linux capabilities, no privilege escalation.
And nothing secret baked into either image's layers or environment."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.docker

HARDENED = ("--user", "model-server", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges")  # fmt: skip
SECRET_PATTERNS = re.compile(r"(AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY|ghp_[0-9A-Za-z]{30,}|"
                             r"hf_[0-9A-Za-z]{30,}|x-api-key)", re.I)  # fmt: skip


def test_serves_hardened_read_only_without_capabilities(start_serving, artifact_dir, docker_cli):
    container = start_serving(artifact_dir, *HARDENED, name="llmft-test-serve-hardened")
    request = {"inputs": "What is SageMaker?", "parameters": {"max_new_tokens": 4}}
    status, _, body = container.post("/invocations", request)
    assert status == 200, body
    whoami = docker_cli.run("exec", container.name, "id", "-u").stdout.strip()
    assert whoami != "0"
    write = docker_cli.run("exec", container.name, "sh", "-c", "touch /opt/ml/model/x || touch /opt/program/x",
                           check=False)  # fmt: skip
    assert write.returncode != 0, "the model and the code must not be writable"
    assert container.stop() < 30, container.logs()


def test_no_secret_in_image_layers_or_environment(images, docker_cli):
    for image in (images.serve, images.train):
        history = docker_cli.run("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
        env = "\n".join(docker_cli.inspect(image)["Config"].get("Env") or [])
        for text in (history, env):
            assert not SECRET_PATTERNS.search(text), SECRET_PATTERNS.search(text).group(0)
