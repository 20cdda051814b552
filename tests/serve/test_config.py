"""ServeConfig: the SageMaker env mapping, parsed once and strictly."""

from pathlib import Path

import pytest
from serve.config import ConfigError, ServeConfig


def test_defaults_follow_the_sagemaker_contract():
    config = ServeConfig.from_env({})
    assert config.model_dir == Path("/opt/ml/model")
    assert (config.host, config.port, config.workers, config.timeout_s) == ("0.0.0.0", 8080, 1, 60)
    assert config.max_payload_bytes == 6 * 1024 * 1024
    assert config.generation_budget_s < config.timeout_s


def test_sagemaker_env_is_honoured():
    config = ServeConfig.from_env(
        {
            "SAGEMAKER_BASE_DIR": "/srv/ml",
            "SAGEMAKER_BIND_TO_PORT": "9090",
            "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT": "120",
            "SERVE_TRUST_REMOTE_CODE": "true",
            "SERVE_MAX_NEW_TOKENS": "512",
            "SAGEMAKER_PROGRAM": "inference.py",  # set by SDKs, ignored
        }
    )
    assert config.model_dir == Path("/srv/ml/model")
    assert (config.port, config.workers, config.timeout_s) == (9090, 2, 120)
    assert config.trust_remote_code is True and config.max_new_tokens_cap == 512


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVE_MAX_BATCH": "4"}, "unknown setting"),
        ({"SAGEMAKER_BIND_TO_PORT": "http"}, "SAGEMAKER_BIND_TO_PORT"),
        ({"SAGEMAKER_MODEL_SERVER_WORKERS": "0"}, "SAGEMAKER_MODEL_SERVER_WORKERS"),
        ({"SERVE_TRUST_REMOTE_CODE": "maybe"}, "SERVE_TRUST_REMOTE_CODE"),
        ({"SERVE_MAX_QUEUE": "2", "SERVE_MAX_BATCH_SIZE": "8"}, "SERVE_MAX_QUEUE"),
        ({"SERVE_GRACEFUL_TIMEOUT": "40"}, "SERVE_GRACEFUL_TIMEOUT"),
        ({"SERVE_CPU_MATMUL": "fast"}, "SERVE_CPU_MATMUL must be auto, packed or stock"),
    ],
)
def test_bad_settings_fail_with_the_env_name(env, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_env(env)
