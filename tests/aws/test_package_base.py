"""`llmft-aws package-base` in-process: the base variant built (here, or planned in the training image) and uploaded
where `deploy --variant base=...` takes it from. No AWS call leaves the machine (see conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from .test_cli import dry_run_calls


class FakeS3:
    """Records upload_file and keeps a copy of what was uploaded."""

    def __init__(self, copies: Path):
        self.copies = copies
        self.uploads: list[dict] = []

    def upload_file(self, **params):
        self.uploads.append(params)
        shutil.copy(params["Filename"], self.copies / "uploaded.tar.gz")


@pytest.fixture
def fake_s3(monkeypatch, tmp_path):
    from llmft_aws import context

    s3 = FakeS3(tmp_path)
    monkeypatch.setattr(context.AwsContext, "client", lambda self, service, **kw: s3)
    return s3


def test_help(cli):
    code, out, _ = cli("package-base", "--help")
    assert code == 0 and "--dry-run" in out and "--keep-dir" in out


def test_the_choices_are_the_training_images():
    from llmft_aws import base_variant
    from trainer.base_variant import DTYPES, PROMPT_FORMATS

    assert (base_variant.PROMPT_FORMATS, base_variant.DTYPES) == (PROMPT_FORMATS, DTYPES)


def test_dry_run_in_the_training_image_mounts_the_model_and_uploads(cli, tmp_path):
    model = tmp_path / "dolly-v2-3b"
    model.mkdir()
    code, out, err = cli(
        "package-base", "--dry-run", "--image", "train:1", "--model", str(model), "--s3-uri", "s3://art/base/"
    )
    assert code == 0, err
    [plan] = [line for line in out.splitlines() if line.startswith("[dry-run] docker run")]
    assert "--user UID:GID" in plan and f"-v {model}:/models/dolly-v2-3b:ro" in plan
    assert plan.endswith(
        "train:1 package-base --model /models/dolly-v2-3b --output /out/model.tar.gz --prompt-format auto --dtype auto"
    )
    [(op, params)] = dry_run_calls(out)
    assert op == "s3.upload_file" and (params["Bucket"], params["Key"]) == ("art", "base/model.tar.gz")
    assert out.strip().splitlines()[-1] == "s3://art/base/model.tar.gz"
    assert not Path(params["Filename"]).parent.exists()  # the temporary work folder is gone


def test_dry_run_of_a_hub_model_shares_the_hugging_face_cache_and_token_by_name(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    code, out, err = cli(
        "package-base",
        "--dry-run",
        "--image",
        "train:1",
        "--model",
        "databricks/dolly-v2-3b",
        "--dtype",
        "bfloat16",
        "--s3-uri",
        "s3://art/ab/dolly-base.tar.gz",
    )
    assert code == 0, err
    assert f"-v {tmp_path / 'hf'}:/hf-home" in out and "-e HF_TOKEN " in out and "hf_secret" not in out
    assert "--model databricks/dolly-v2-3b" in out and "--dtype bfloat16" in out
    assert out.strip().splitlines()[-1] == "s3://art/ab/dolly-base.tar.gz"


def test_dry_run_in_this_process(cli, tmp_path):
    keep = tmp_path / "keep"
    code, out, err = cli(
        "package-base", "--dry-run", "--model", "embedded:SmolLM2-135M-Instruct", "--s3-uri", "s3://art", "--keep-dir",
        str(keep),
    )  # fmt: skip
    assert code == 0, err
    assert f"[dry-run] in this process: package-base --model embedded:SmolLM2-135M-Instruct --output {keep}" in out
    assert dry_run_calls(out)[0][1]["Key"] == "model.tar.gz"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "./no-such-model", "--s3-uri", "s3://art/base/"], "not a directory"),
        (["--model", __file__, "--s3-uri", "s3://art/base/"], "not a directory"),
        (["--model", "org/model", "--s3-uri", "art/base/"], "not an S3 URI"),
    ],
)
def test_argument_errors(cli, args, message):
    code, out, err = cli("package-base", "--dry-run", *args)
    assert code == 2 and message in err and out == ""


def test_without_torch_here_it_asks_for_the_training_image(cli, monkeypatch):
    from llmft_aws import base_variant

    monkeypatch.setattr(base_variant, "in_process_available", lambda: False)
    code, _, err = cli("package-base", "--model", "org/model", "--s3-uri", "s3://art/base/")
    assert code == 2 and "pass --image TRAIN_IMAGE" in err


def test_packages_in_this_process_and_uploads(cli, fake_s3, tiny_dolly_model_dir, tmp_path):
    code, out, err = cli("package-base", "--model", str(tiny_dolly_model_dir), "--s3-uri", "s3://art/base/")
    assert code == 0, err
    assert out == "s3://art/base/model.tar.gz\n"  # stdout: the URI only; progress went to stderr
    assert "base variant written to" in err
    [upload] = fake_s3.uploads
    assert (upload["Bucket"], upload["Key"]) == ("art", "base/model.tar.gz")
    assert not Path(upload["Filename"]).exists()
    with tarfile.open(tmp_path / "uploaded.tar.gz") as tar:
        assert "model.safetensors" in tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))
    assert manifest["method"] == "untuned" and manifest["prompt_format"] == "dolly"

    code, _, err = cli("package-base", "--model", str(tmp_path), "--s3-uri", "s3://art/base/")
    assert code == 2 and "no config.json" in err  # the training code's own errors are usage errors here


def test_packages_in_the_training_image(cli, fake_s3, monkeypatch, tmp_path):
    from llmft_aws import base_variant

    ran = []

    def docker(command, **_):
        ran.append(command)
        work_dir = next(v.split(":")[0] for v in command if v.endswith(":/out"))
        (Path(work_dir) / "model.tar.gz").write_bytes(b"archive")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(base_variant.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(base_variant.subprocess, "run", docker)
    keep = tmp_path / "keep"
    code, out, err = cli(
        "package-base", "--image", "train:1", "--model", "org/model", "--s3-uri", "s3://art/b/", "--keep-dir", str(keep)
    )
    assert code == 0, err
    assert f"--user {os.getuid()}:{os.getgid()}" in " ".join(ran[0])
    assert (keep / "model.tar.gz").read_bytes() == b"archive"  # kept, and uploaded
    assert fake_s3.uploads[0]["Filename"] == str(keep / "model.tar.gz")

    monkeypatch.setattr(base_variant.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 3))
    code, out, err = cli("package-base", "--image", "train:1", "--model", "org/model", "--s3-uri", "s3://art/b/")
    assert code == 1 and "exited with 3" in err and out == ""
