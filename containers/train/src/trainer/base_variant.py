"""The A/B test's base variant: the untuned base model, packaged the way a training job packages a tuned one.

    containers/train/package-base --model databricks/dolly-v2-3b --output base/model.tar.gz
    containers/train/package-base --model ./dolly-v2-3b --output base/model     # a directory instead of a tar
    containers/train/package-base --tuned-artifact job/model --output base/model.tar.gz   # match a trained artifact
    docker run IMAGE package-base ...                                             # the training image's command

The base model is a hub id, the embedded default (embedded:SmolLM2-135M-Instruct) or a Transformers directory,
whose weights may be safetensors or a pickled `pytorch_model.bin` (loaded with torch's weights-only unpickler;
the serving image refuses pickles, so it is written back as safetensors). The prompt format is chosen and
installed by the training code itself (trainer.prompts), so the base model answers the very prompt the tuned
model of the same base answers, and stops on the same markers; the weights keep the base's floating type,
as a training job's artifact does. `--tuned-artifact` takes the base model, prompt format, dtype and seed
from a trained artifact's manifest.json, so the pair matches by construction.

The output is what a training job leaves in its model directory (safetensors, tokenizer with the chat template,
generation_config.json with the stop tokens, manifest.json with `"method": "untuned"`), as a directory or, for a
path ending in .tar.gz, as a model.tar.gz with the files at its root. It appears whole or not at all: it is
built in a hidden staging folder next to it and moved into place at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import prompts
from .artifact import MANIFEST, save_artifact
from .config import DEFAULT_REVISION, EMBEDDED_MODEL_ID, TrainConfig
from .errors import ConfigError, UserError
from .modeling import BaseModel, load_for_prompt_format, load_tokenizer, resolve_base_model, stored_dtype

log = logging.getLogger(__name__)

UNTUNED = "untuned"  # manifest.json's `method` for a base variant (a trained artifact says lora or full)
ARCHIVE_SUFFIX = ".tar.gz"
_TRAIN_DEFAULTS = {f.name: f for f in dataclasses.fields(TrainConfig)}
PROMPT_FORMATS = _TRAIN_DEFAULTS["prompt_format"].metadata["choices"]
DTYPES = _TRAIN_DEFAULTS["save_dtype"].metadata["choices"]


@dataclass(frozen=True)
class PackageRequest:
    model: str  # hub id, embedded id, or directory: what the training job's `model_id` names
    output: Path  # a directory, or a file ending in .tar.gz
    prompt_format: str = _TRAIN_DEFAULTS["prompt_format"].default
    dtype: str = _TRAIN_DEFAULTS["save_dtype"].default
    trust_remote_code: bool = False
    seed: int = _TRAIN_DEFAULTS["seed"].default  # rows of tokens the format adds start random, seeded as in training
    revision: str = DEFAULT_REVISION  # a hub model's branch, tag or commit, as the training hyperparameter

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise UserError(f"prompt format {self.prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not self.revision.strip():
            raise UserError("--revision must not be empty (the hub's default branch is 'main')")

    @property
    def archive(self) -> bool:
        return self.output.name.endswith(ARCHIVE_SUFFIX)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="package-base", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        help="the base model, as the training hyperparameter `model_id` names it: hub id, "
        f"{EMBEDDED_MODEL_ID}, or a directory (required unless --tuned-artifact says)",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="a directory, or a path ending in .tar.gz for a model.tar.gz"
    )
    parser.add_argument(
        "--tuned-artifact",
        type=Path,
        help="a trained artifact (directory with manifest.json) to match: its base model, prompt format, dtype and "
        "seed are the defaults",
    )
    parser.add_argument(
        "--prompt-format", choices=PROMPT_FORMATS, help="as the training hyperparameter prompt_format (default auto)"
    )
    parser.add_argument("--dtype", choices=DTYPES, help="weights' floating type; auto keeps the base model's")
    parser.add_argument(
        "--trust-remote-code", action="store_true", default=None, help="allow the base model's own Python code to run"
    )
    parser.add_argument("--seed", type=int, help="seed of the embedding rows of tokens the format adds (default 42)")
    parser.add_argument(
        "--revision",
        help="a hub model's branch, tag or commit, as the training hyperparameter `revision` (default main; "
        "--tuned-artifact: the commit the training job loaded)",
    )
    return parser


def parse_args(argv: list[str]) -> PackageRequest:
    """The request from the command line; unset options come from --tuned-artifact's manifest, then defaults."""
    args = build_parser().parse_args(argv)
    matched = _from_manifest(args.tuned_artifact) if args.tuned_artifact else {}
    model = args.model or matched.get("model")
    if not model:
        raise UserError("--model is required (a hub id, a directory, or " + EMBEDDED_MODEL_ID + ")")
    given = {
        "prompt_format": args.prompt_format,
        "dtype": args.dtype,
        "trust_remote_code": args.trust_remote_code,
        "seed": args.seed,
        "revision": args.revision,
    }
    options = {k: v for k, v in matched.items() if k != "model"} | {k: v for k, v in given.items() if v is not None}
    return PackageRequest(model=model, output=args.output, **options)


def package_base(request: PackageRequest, cache_dir: Path) -> Path:
    """Write the base variant to request.output (whole or not at all); returns the output path."""
    import torch

    _check_output(request)
    base = resolve_model(request.model, cache_dir, request.revision)
    tokenizer = load_tokenizer(base, request.trust_remote_code)
    setup = _install_prompt_format(tokenizer, request.prompt_format, base)
    dtype = request.dtype if request.dtype != "auto" else stored_dtype(base, request.trust_remote_code)
    log.info(
        "base model %s: prompt format %s, stop tokens %s, stop strings %s, %s weights",
        base.name,
        setup.format,
        list(setup.stop_token_ids),
        list(setup.stop_strings),
        dtype,
    )
    model = load_for_prompt_format(
        base,
        tokenizer,
        added_tokens=bool(setup.added_tokens),
        seed=request.seed,
        trust_remote_code=request.trust_remote_code,
        dtype=getattr(torch, dtype),
    )
    manifest = _manifest(base, setup, dtype)

    output = request.output
    output.parent.mkdir(parents=True, exist_ok=True)
    # Next to the output, so the final move is a rename on one file system.
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        model_dir = staging / "model"
        save_artifact(model, tokenizer, setup.stop_token_ids, model_dir, manifest, setup.stop_strings)
        if request.archive:
            archive = staging / output.name
            _write_archive(model_dir, archive)
            os.replace(archive, output)
        else:
            model_dir.chmod(0o755)  # a serving container that runs as non-root must list it
            _replace_dir(model_dir, output, staging / "previous")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("base variant written to %s", output)
    return output


def resolve_model(model: str, cache_dir: Path, revision: str = DEFAULT_REVISION) -> BaseModel:
    """A hub id or the embedded default as training resolves them; a directory checked first, with the fix named."""
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith(("/", "./", "../", "~"))
    if model == EMBEDDED_MODEL_ID or not looks_local:
        try:
            return resolve_base_model(model, None, cache_dir, revision)
        except ConfigError as e:  # worded for the hyperparameter; here it is the command's option
            raise UserError(str(e).replace("hyperparameter 'revision'", "--revision")) from None
    if revision != DEFAULT_REVISION:
        raise UserError(f"--revision {revision}: applies to hub models only, and --model {model} is a directory")
    if path.is_file():
        raise UserError(
            f"--model {model}: this is a file; pass the directory that holds it with config.json and the tokenizer"
        )
    if not path.is_dir():
        raise UserError(f"--model {model}: no such directory")
    if not (path / "config.json").exists():
        raise UserError(f"--model {model}: no config.json; expected a Transformers model directory")
    if not any(p.suffix == ".safetensors" or p.name.startswith("pytorch_model") for p in path.iterdir()):
        raise UserError(
            f"--model {model}: no weights to load (model*.safetensors or pytorch_model*.bin, sharded or not)"
        )
    return BaseModel(str(path), model)


def _from_manifest(artifact: Path) -> dict:
    path = artifact / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        matched = {"prompt_format": manifest["prompt_format"], "dtype": manifest["dtype"]}
        hyperparameters = manifest.get("hyperparameters") or {}
        matched |= {k: hyperparameters[k] for k in ("trust_remote_code", "seed") if k in hyperparameters}
        # A base from a `model` channel is named by description only: --model must say where it is.
        if not manifest["base_model"].startswith("model channel"):
            matched["model"] = manifest["base_model"]
            # The very weights the job trained from: the commit its revision resolved to, else the revision.
            revision = manifest.get("base_model_commit") or manifest.get("base_model_revision")
            if revision:
                matched["revision"] = revision
    except FileNotFoundError as e:
        raise UserError(f"--tuned-artifact: {path} does not exist; pass a finished artifact's directory") from e
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--tuned-artifact: {path} is not a training artifact's manifest ({e!r})") from e
    log.info("matching %s: %s", artifact, matched)
    return matched


def _check_output(request: PackageRequest) -> None:
    """Before anything is loaded: refuse an output that is not ours to replace."""
    output = request.output
    if request.archive:
        if output.is_dir():
            raise UserError(f"--output {output}: a directory; a path ending in {ARCHIVE_SUFFIX} names a file")
        return
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: a file; name a directory, or a path ending in {ARCHIVE_SUFFIX}")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).exists():
        raise UserError(
            f"--output {output}: holds files but no {MANIFEST} (not an artifact); name a new or empty directory"
        )


def _install_prompt_format(tokenizer, requested: str, base: BaseModel) -> prompts.PromptSetup:
    """Exactly what a training job of this base installs (trainer.job.prepare): same choice, same tokenizer set-up."""
    try:
        return prompts.prepare_tokenizer(tokenizer, prompts.choose_format(requested, tokenizer, base.name))
    except ValueError as e:
        raise UserError(f"--prompt-format {requested}: {e}; use --prompt-format dolly") from e


def _manifest(base: BaseModel, setup: prompts.PromptSetup, dtype: str) -> dict:
    import torch
    import transformers

    return {
        "format_version": 1,
        "base_model": base.name,
        "base_model_revision": base.revision,  # as a training job's manifest records them
        "base_model_commit": base.commit,
        "method": UNTUNED,
        "prompt_format": setup.format,
        "dtype": dtype,
        "stop_token_ids": list(setup.stop_token_ids),
        "stop_strings": list(setup.stop_strings),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_archive(model_dir: Path, path: Path) -> None:
    """model.tar.gz as SageMaker makes one from /opt/ml/model: the files at the archive's root."""

    def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        for file in sorted(model_dir.iterdir()):
            tar.add(file, arcname=file.name, filter=anonymous)
    path.chmod(0o644)


def _replace_dir(new: Path, target: Path, previous: Path) -> None:
    """Move `new` to `target`; a previous artifact there is moved aside first (and removed with the staging)."""
    try:
        if target.exists():
            os.replace(target, previous)
        try:
            os.replace(new, target)
        except OSError:
            if previous.exists():
                os.replace(previous, target)  # put the previous artifact back
            raise
    except OSError as e:
        raise UserError(
            f"--output {target}: cannot move the finished artifact into place ({e}); a mount point cannot be "
            "replaced, name a folder inside it"
        ) from e
