"""push-images against moto (as the ECR API) and Debian's docker-registry (as the registry), both on loopback.

The registry asks for the password moto's GetAuthorizationToken hands out, so a passing push proves the
command logged Docker in with the token from the ECR API. The pushed images are two tiny ones built here with
the content-key label scripts/build-images.sh stamps (pushing the real 2-3 GB images adds minutes, not checks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from base64 import b64encode

import pytest

pytestmark = pytest.mark.docker

MOTO_PASSWORD = "123456789012-auth-token"  # what moto's GetAuthorizationToken returns for its default account
CONTENT_KEY_LABEL = "org.sagemaker-llm-finetune.content-key"


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def registry(docker_engine, servers, tmp_path_factory) -> str:
    """docker-registry on a loopback port, with htpasswd auth that accepts only AWS / moto's token."""
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        pytest.fail("no docker-registry binary: `make test` installs it (scripts/setup.d/30-registry.sh, as root)")
    root = tmp_path_factory.mktemp("registry")
    hashed = subprocess.run(  # bcrypt, as the registry wants; it comes with sagemaker-core (paramiko)
        [
            sys.executable,
            "-c",
            f"import bcrypt; print(bcrypt.hashpw(b'{MOTO_PASSWORD}', bcrypt.gensalt(rounds=4)).decode())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (root / "htpasswd").write_text(f"AWS:{hashed}\n")
    port = servers.free_port()
    (root / "config.yml").write_text(
        json.dumps(
            {  # JSON is YAML
                "version": 0.1,
                "log": {"level": "warn"},
                "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
                "http": {"addr": f"127.0.0.1:{port}"},
                "auth": {"htpasswd": {"realm": "test", "path": str(root / "htpasswd")}},
            }
        )
    )
    servers.start("registry", [binary, "serve", str(root / "config.yml")], f"http://127.0.0.1:{port}/v2/")
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tiny_images(docker_engine, tmp_path_factory):
    """sagemaker-llm-finetune-{train,serve}:<test tag>, a few bytes each, labelled like build-images.sh does."""
    tag = f"awstest-{os.getpid()}"
    keys = {}
    for name in ("train", "serve"):
        context = tmp_path_factory.mktemp(f"image-{name}")
        (context / "hello.txt").write_text(f"{name} {tag}\n")
        (context / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /hello.txt\n")
        keys[name] = f"{name}{os.getpid():x}".ljust(16, "0")[:16]
        _docker(
            "build",
            "-q",
            "--label",
            f"{CONTENT_KEY_LABEL}={keys[name]}",
            "-t",
            f"sagemaker-llm-finetune-{name}:{tag}",
            str(context),
        )
    yield tag, keys
    for name in keys:
        subprocess.run(["docker", "rmi", "-f", f"sagemaker-llm-finetune-{name}:{tag}"], capture_output=True)


def _registry_tags(registry: str, repository: str) -> list[str]:
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/tags/list",
        headers={"Authorization": "Basic " + b64encode(f"AWS:{MOTO_PASSWORD}".encode()).decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["tags"]


def test_push_images_creates_repositories_logs_in_with_the_ecr_token_and_pushes_both(
    run_cli, moto, registry, tiny_images, tmp_path
):
    tag, keys = tiny_images
    env = {**moto.env, "DOCKER_CONFIG": str(tmp_path / "docker-config")}  # keep the login out of ~/.docker
    args = ("push-images", "--local-tag", tag, "--registry", registry)

    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    uris = first.stdout.split()
    assert uris == [f"{registry}/sagemaker-llm-finetune-{n}:{keys[n]}" for n in ("train", "serve")]
    for name in ("train", "serve"):
        assert _registry_tags(registry, f"sagemaker-llm-finetune-{name}") == [keys[name]]
    assert "docker logged in to" in first.stderr

    ecr = moto.client("ecr")
    for name in ("train", "serve"):
        repo = ecr.describe_repositories(repositoryNames=[f"sagemaker-llm-finetune-{name}"])["repositories"][0]
        assert repo["imageScanningConfiguration"]["scanOnPush"] is True
        assert repo["imageTagMutability"] == "IMMUTABLE"
        policy = json.loads(ecr.get_lifecycle_policy(repositoryName=repo["repositoryName"])["lifecyclePolicyText"])
        assert {r["selection"]["tagStatus"] for r in policy["rules"]} == {"untagged", "any"}

    again = run_cli(*args, env=env)  # safe to re-run: the repositories exist, the same versions are pushed
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == uris
    assert "exists" in again.stderr


def test_push_images_names_the_missing_local_image(run_cli, moto, tmp_path):
    result = run_cli("push-images", "--local-tag", "no-such-tag", env={**moto.env, "DOCKER_CONFIG": str(tmp_path)})
    assert result.returncode == 2
    assert "no local image sagemaker-llm-finetune-train:no-such-tag" in result.stderr
    assert "scripts/build-images.sh" in result.stderr
