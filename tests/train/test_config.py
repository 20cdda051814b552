import dataclasses
import json
import re
from pathlib import Path

import pytest
from trainer.config import EMBEDDED_MODEL_ID, TrainConfig
from trainer.errors import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_are_the_embedded_lora_recipe():
    config = TrainConfig.from_hyperparameters({})
    assert config.model_id == EMBEDDED_MODEL_ID
    assert config.method == "lora" and config.lora_r == 16


@pytest.mark.parametrize("encoding", ["sdk_v2", "raw"])
def test_both_hyperparameter_encodings_give_the_same_config(encoding):
    values = {
        "method": "full",
        "epochs": 2,
        "learning_rate": 0.0002,
        "gradient_checkpointing": True,
        "lora_target_modules": "q_proj,v_proj",
    }
    if encoding == "sdk_v2":  # SDK v2 estimators json.dumps every value
        raw = {k: json.dumps(v) for k, v in values.items()}
    else:  # SDK v3 / raw API: strings as they are
        raw = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}
    config = TrainConfig.from_hyperparameters(raw)
    assert (config.method, config.epochs, config.learning_rate, config.gradient_checkpointing) == (
        "full",
        2.0,
        0.0002,
        True,
    )
    assert config.lora_targets == ["q_proj", "v_proj"]


def test_unknown_hyperparameter_is_named():
    with pytest.raises(ConfigError, match=r"unknown hyperparameter 'lerning_rate'.*accepted: .*learning_rate"):
        TrainConfig.from_hyperparameters({"lerning_rate": "0.1"})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", "three", r"'epochs': expected a number, got 'three'"),
        ("lora_r", "2.5", r"'lora_r': expected an integer"),
        ("gradient_checkpointing", "maybe", r"'gradient_checkpointing': expected true or false"),
        ("lora_r", "0", r"'lora_r': 0 must be at least 1"),
        ("method", "qlora", r"'method': 'qlora' is not one of lora, full"),
        ("validation_fraction", "1.5", r"'validation_fraction'"),
        ("lr_decay_ratio", "1.5", r"'lr_decay_ratio': must be in \[0, 1\]"),
        ("model_id", "[1, 2]", r"'model_id': expected a string"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_hyperparameters({key: value})


def test_sdk_reserved_keys_are_ignored_and_aliases_accepted():
    config = TrainConfig.from_hyperparameters(
        {
            "sagemaker_region": '"us-east-1"',
            "sagemaker_job_name": '"x"',
            "instruction_column": "prompt",
        }
    )
    assert config.question_column == "prompt"


def test_readme_documents_every_hyperparameter_with_its_default():
    text = README.read_text(encoding="utf-8")
    for f in dataclasses.fields(TrainConfig):
        row = re.search(rf"^\| `{f.name}` \| `([^`]*)` \|", text, re.MULTILINE)
        assert row, f"README's hyperparameter table lacks {f.name}"
        default = f.default
        expected = str(default).lower() if isinstance(default, bool) else str(default)
        assert row.group(1) == expected, f"README gives {f.name} default {row.group(1)!r}, code has {expected!r}"


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ({"revision": "v2"}, r"'revision': the embedded default model has no revisions"),
        ({"model_id": "org/model", "revision": " "}, r"'revision': must not be empty"),
    ],
)
def test_a_revision_needs_a_hub_model(hyperparameters, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_hyperparameters(hyperparameters)
    assert TrainConfig.from_hyperparameters({"model_id": "org/model", "revision": "v2"}).revision == "v2"


@pytest.mark.parametrize("other", [{"method": "full"}, {"deepspeed": "zero2"}])
def test_trained_token_embeddings_are_refused_outside_plain_lora(other):
    with pytest.raises(ConfigError, match=r"'lora_train_token_embeddings': needs method=lora without DeepSpeed"):
        TrainConfig.from_hyperparameters({"lora_train_token_embeddings": "true", **other})


@pytest.mark.parametrize(
    ("hyperparameters", "trained"),
    [
        ({}, True),
        ({"deepspeed": "zero2"}, False),
        ({"method": "full"}, False),
        ({"lora_train_token_embeddings": "false"}, False),
        ({"lora_train_token_embeddings": True}, True),  # SDK v2 sends json.dumps(True): "true", decoded to a bool
        ({"lora_train_token_embeddings": "False"}, False),  # str(False), as a hand-written script sends it
    ],
)
def test_token_embeddings_train_by_default_wherever_lora_supports_them(hyperparameters, trained):
    assert TrainConfig.from_hyperparameters(hyperparameters).train_token_embeddings is trained
