"""Package the A/B test's base variant, the untuned base model, as a servable model.tar.gz, and upload it to S3.

    scripts/llmft-aws package-base --image TRAIN_IMAGE --model embedded:SmolLM2-135M-Instruct \
        --s3-uri s3://BUCKET/base/model.tar.gz        # then: deploy ... --variant base=s3://BUCKET/base/model.tar.gz
    scripts/llmft-aws package-base --model ./dolly-v2-3b --s3-uri s3://BUCKET/base/ [--keep-dir runs/base]

--model is the base the training job used (its `model_id` hyperparameter; the image's default is
embedded:SmolLM2-135M-Instruct): a hub id or a local directory, whose weights may be a pickled pytorch_model.bin
(written back as safetensors). The work is the training image's own `package-base` command
(containers/train/src/trainer/base_variant.py): the same prompt format a training job of that base installs,
so the base variant sees the prompt the tuned one sees. It runs in the training image with --image (`docker
run` on this machine, no GPU needed), else in this process where torch and transformers are installed (the main
.venv; scripts/llmft-aws's own venv has neither). Prints the model.tar.gz's S3 URI on stdout.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from llmft_aws.context import AwsContext, CommandError, UsageError, log
from llmft_aws.data import parse_s3_uri

ARCHIVE = "model.tar.gz"
PROMPT_FORMATS = ("auto", "chat_template", "dolly")  # the training image's choices (trainer.config.TrainConfig)
DTYPES = ("auto", "float32", "bfloat16", "float16")
IN_IMAGE_OUT = "/out"  # where the container writes model.tar.gz (the work folder, mounted)
IN_IMAGE_MODELS = "/models"  # a local --model directory, mounted read-only under its own name
IN_IMAGE_HF_HOME = "/hf-home"  # this machine's Hugging Face cache, so a hub model downloads once


def s3_target(uri: str) -> tuple[str, str]:
    """(bucket, key): a URI ending in .tar.gz is the object itself, any other a prefix for model.tar.gz."""
    bucket, key = parse_s3_uri(uri)
    if not key.endswith(".tar.gz"):
        key = "/".join(p for p in (key, ARCHIVE) if p)
    return bucket, key


def package_arguments(args, model: str, output: str) -> list[str]:
    """The arguments of the image's `package-base` command (the same in a container and in this process)."""
    argv = ["--model", model, "--output", output, "--prompt-format", args.prompt_format, "--dtype", args.dtype]
    return argv + (["--trust-remote-code"] if args.trust_remote_code else [])


def docker_command(args, work_dir: Path, uid_gid: str) -> list[str]:
    """`docker run` of the training image's package-base, as this user, writing into `work_dir`."""
    command = ["docker", "run", "--rm", "--user", uid_gid, "-e", "HOME=/tmp", "-v", f"{work_dir}:{IN_IMAGE_OUT}"]
    model = args.model
    local = Path(model).expanduser()
    if local.is_dir():
        # Mounted under its own name: the prompt format's choice reads the name (a Dolly checkpoint's folder).
        model = f"{IN_IMAGE_MODELS}/{local.resolve().name}"
        command += ["-v", f"{local.resolve()}:{model}:ro"]
    elif ":" not in model:  # a hub id (not the embedded model): the download lands in this machine's cache
        hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
        command += ["-e", f"HF_HOME={IN_IMAGE_HF_HOME}", "-v", f"{hf_home}:{IN_IMAGE_HF_HOME}"]
        if os.environ.get("HF_TOKEN"):
            command += ["-e", "HF_TOKEN"]  # by name: docker reads the value from this environment, no echo
    return [*command, args.image, "package-base", *package_arguments(args, model, f"{IN_IMAGE_OUT}/{ARCHIVE}")]


def in_process_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers", "trainer"))


def package_in_process(args, archive: Path) -> None:
    from trainer.base_variant import package_base, parse_args
    from trainer.errors import UserError
    from trainer.modeling import default_cache_dir

    progress = logging.StreamHandler(sys.stderr)  # its progress on stderr; stdout carries only the URI
    progress.setFormatter(logging.Formatter("[llmft-aws] %(message)s"))
    trainer_log = logging.getLogger("trainer")
    level = trainer_log.level
    trainer_log.addHandler(progress)
    trainer_log.setLevel(logging.INFO)
    try:
        package_base(parse_args(package_arguments(args, args.model, str(archive))), default_cache_dir())
    except UserError as e:
        raise UsageError(str(e)) from e
    finally:
        trainer_log.removeHandler(progress)
        trainer_log.setLevel(level)


def package_in_image(args, work_dir: Path) -> None:
    command = docker_command(args, work_dir, f"{os.getuid()}:{os.getgid()}")
    if shutil.which("docker") is None:
        raise UsageError("--image needs docker on this machine (not found on PATH)")
    log("running " + shlex.join(command))
    result = subprocess.run(command, stdout=sys.stderr)  # the container's log is progress: stderr
    if result.returncode != 0:
        raise CommandError(f"package-base in {args.image} exited with {result.returncode} (its log is above)")


def run(ctx: AwsContext, args) -> int:
    bucket, key = s3_target(args.s3_uri)
    local = Path(args.model).expanduser()
    if (local.exists() or args.model.startswith(("/", "./", "../", "~"))) and not local.is_dir():
        raise UsageError(f"--model {args.model}: not a directory (a model directory with config.json and weights)")
    if not args.image and not in_process_available():
        raise UsageError(
            "this Python has no torch/transformers to package the model with: pass --image TRAIN_IMAGE (the "
            "training image, from push-images or scripts/build-images.sh) to run it there"
        )
    keep = args.keep_dir is not None
    work_dir = args.keep_dir.resolve() if keep else Path(tempfile.mkdtemp(prefix="llmft-base-"))
    archive = work_dir / ARCHIVE
    try:
        if ctx.dry_run:
            if args.image:
                plan = shlex.join(docker_command(args, work_dir, "UID:GID"))
            else:
                plan = "in this process: package-base " + shlex.join(package_arguments(args, args.model, str(archive)))
            print(f"[dry-run] {plan}")
        else:
            work_dir.mkdir(parents=True, exist_ok=True)
            log(f"packaging {args.model} into {archive}")
            if args.image:
                package_in_image(args, work_dir)
            else:
                package_in_process(args, archive)
            if not archive.is_file():
                raise CommandError(f"package-base left no {archive}")
        log(f"uploading s3://{bucket}/{key}")
        # upload_file: multipart for a large model, the bucket's default encryption (as upload-data).
        ctx.client("s3").upload_file(Filename=str(archive), Bucket=bucket, Key=key)
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"s3://{bucket}/{key}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="the base model the training job used (its model_id: hub id, directory, embedded:SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--s3-uri", required=True, help="where model.tar.gz goes: s3://BUCKET/PREFIX/ or s3://BUCKET/KEY.tar.gz"
    )
    parser.add_argument(
        "--image", help="training image to package in (docker run; default: this process, if it has torch)"
    )
    parser.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default="auto",
        help="as the training job's prompt_format hyperparameter (default auto, as training)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights' type (default: the base model's)")
    parser.add_argument("--trust-remote-code", action="store_true", help="as the training job's trust_remote_code")
    parser.add_argument(
        "--keep-dir", type=Path, help="build model.tar.gz in this folder and keep it (default: a temporary one)"
    )
