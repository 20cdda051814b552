"""The env names of SageMaker's TGI and LMI containers: mapped onto ours, refused, or accepted and logged."""

from pathlib import Path

import pytest
from serve import placement
from serve.config import ALIASES, ConfigError, ServeConfig
from serve.placement import Gpu

TGI_DEPLOY = {  # what a typical TGI-on-SageMaker deployment sets (HuggingFaceModel(env=...))
    "HF_MODEL_ID": "/opt/ml/model",
    "SM_NUM_GPUS": "1",
    "MAX_INPUT_TOKENS": "3072",
    "MAX_TOTAL_TOKENS": "4096",
    "MAX_BATCH_TOTAL_TOKENS": "8192",
    "MAX_CONCURRENT_REQUESTS": "128",
    "HF_MODEL_TRUST_REMOTE_CODE": "true",
    "DTYPE": "bfloat16",
    "MESSAGES_API_ENABLED": "true",
}


def test_a_tgi_deployment_maps_onto_our_settings():
    config = ServeConfig.from_env(TGI_DEPLOY)
    assert config.model_dir == Path("/opt/ml/model")
    assert config.num_gpus == 1
    assert config.max_input_tokens == 4096  # ours is prompt + answer: TGI's MAX_TOTAL_TOKENS
    assert config.max_batch_total_tokens == 8192
    assert config.max_queue == 128
    assert config.trust_remote_code is True
    assert config.dtype == "bfloat16"
    assert config.sources["max_queue"] == "MAX_CONCURRENT_REQUESTS"
    # Nothing is silent: every name read or ignored has its start-up line.
    notices = "\n".join(config.notices)
    for name in TGI_DEPLOY:
        assert f"{name}=" in notices
    assert "MESSAGES_API_ENABLED=true: accepted and ignored" in notices
    assert "MAX_INPUT_TOKENS=3072: read as SERVE_MAX_PROMPT_TOKENS=3072; the longest prompt" in notices
    assert config.max_prompt_tokens == 3072


def test_an_lmi_deployment_maps_onto_our_settings():
    config = ServeConfig.from_env(
        {
            "OPTION_MODEL_ID": "/opt/ml/model",
            "OPTION_ROLLING_BATCH": "auto",
            "OPTION_MAX_ROLLING_BATCH_SIZE": "16",
            "OPTION_MAX_MODEL_LEN": "2048",
            "OPTION_DTYPE": "fp16",
            "OPTION_TRUST_REMOTE_CODE": "false",
            "OPTION_TENSOR_PARALLEL_DEGREE": "max",
            "OPTION_MODEL_LOADING_TIMEOUT": "1800",
        }
    )
    assert (config.max_batch_size, config.max_input_tokens, config.dtype) == (16, 2048, "float16")
    assert config.trust_remote_code is False
    assert config.gpu_placement == "device_map"
    assert any(n.startswith("OPTION_ROLLING_BATCH=auto: accepted") for n in config.notices)
    assert any(n.startswith("OPTION_MODEL_LOADING_TIMEOUT=1800: accepted and ignored") for n in config.notices)


@pytest.mark.parametrize(
    ("raw", "placement_setting", "num_gpus"),
    [("max", "device_map", None), ("1", "per_gpu", None), ("2", "device_map", 2)],
)
def test_tensor_parallel_degree_is_gpus_per_model_copy(raw, placement_setting, num_gpus):
    config = ServeConfig.from_env({"OPTION_TENSOR_PARALLEL_DEGREE": raw})
    assert (config.gpu_placement, config.num_gpus) == (placement_setting, num_gpus)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MAX_INPUT_LENGTH": "100", "SERVE_MAX_INPUT_TOKENS": "200"}, {"max_prompt_tokens": 100}),  # TGI's old name
        ({"MAX_BATCH_SIZE": "4", "SERVE_MAX_QUEUE": "8"}, {"max_batch_size": 4}),
        ({"TRUST_REMOTE_CODE": "1"}, {"trust_remote_code": True}),
        ({"NUM_SHARD": "2"}, {"num_gpus": 2}),
        ({"OPTION_DTYPE": "bf16"}, {"dtype": "bfloat16"}),
        ({"OPTION_DTYPE": "fp32"}, {"dtype": "float32"}),
        ({"HF_MODEL_QUANTIZE": ""}, {}),  # empty is unset, as for our own names
    ],
)
def test_single_names(env, expected):
    config = ServeConfig.from_env(env)
    for name, value in expected.items():
        assert getattr(config, name) == value


def test_hf_model_id_as_a_local_path_is_the_model_directory(tmp_path):
    assert ServeConfig.from_env({"HF_MODEL_ID": str(tmp_path)}).model_dir == tmp_path
    # Agreeing with SAGEMAKER_BASE_DIR is fine.
    config = ServeConfig.from_env({"HF_MODEL_ID": str(tmp_path / "model"), "SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert config.model_dir == tmp_path / "model"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # A hub id or an S3 URI: this server serves the directory SageMaker mounts, and says how to get one.
        ({"HF_MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct"}, r"Hub model id.*ModelDataUrl.*/opt/ml/model"),
        ({"OPTION_MODEL_ID": "s3://bucket/llama/"}, r"S3 location.*does not download models"),
        ({"HF_MODEL_REVISION": "main"}, "hub revision"),
        # Our own name wins only by agreeing: two values for one setting fail, naming both.
        ({"SERVE_MAX_QUEUE": "64", "MAX_CONCURRENT_REQUESTS": "128"}, r"MAX_CONCURRENT_REQUESTS.*SERVE_MAX_QUEUE"),
        ({"SERVE_DTYPE": "float16", "DTYPE": "bfloat16"}, r"DTYPE='bfloat16' and SERVE_DTYPE='float16' disagree"),
        ({"HF_MODEL_ID": "/a", "SAGEMAKER_BASE_DIR": "/b"}, r"HF_MODEL_ID.*SAGEMAKER_BASE_DIR"),
        ({"HF_MODEL_ID": "/a", "OPTION_MODEL_ID": "/b"}, r"OPTION_MODEL_ID='/b' and HF_MODEL_ID='/a' disagree"),
        ({"MAX_INPUT_TOKENS": "10", "MAX_INPUT_LENGTH": "20"}, "MAX_INPUT_LENGTH='20' and MAX_INPUT_TOKENS='10'"),
        # TGI's own rule: the prompt limit is below the total.
        ({"MAX_INPUT_TOKENS": "4096", "MAX_TOTAL_TOKENS": "4096"}, "MAX_INPUT_TOKENS=4096 must be < MAX_TOTAL_TOKENS"),
        # Values that cannot map.
        ({"OPTION_ROLLING_BATCH": "lmi-dist"}, "own continuous-batching engine"),
        ({"OPTION_ROLLING_BATCH": "vllm"}, "OPTION_ROLLING_BATCH=auto or unset it"),
        ({"HF_MODEL_QUANTIZE": "bitsandbytes"}, "does not support it"),
        ({"OPTION_QUANTIZE": "awq"}, "does not support it"),
        ({"OPTION_DTYPE": "int8"}, "quantized types are not supported"),
        ({"DTYPE": "float32"}, r"one of \['bfloat16', 'float16'\]"),
        ({"SM_NUM_GPUS": "0"}, "SM_NUM_GPUS must be >= 1"),
        ({"OPTION_TENSOR_PARALLEL_DEGREE": "two"}, "OPTION_TENSOR_PARALLEL_DEGREE='two' is not a valid int"),
        # Unknown OPTION_* names fail like unknown SERVE_* names.
        ({"OPTION_GPU_MEMORY_UTILIZATION": "0.9"}, r"unknown LMI setting\(s\) \['OPTION_GPU_MEMORY_UTILIZATION'\]"),
        # A range error names the alias and our setting.
        ({"MAX_CONCURRENT_REQUESTS": "4"}, r"MAX_CONCURRENT_REQUESTS \(= SERVE_MAX_QUEUE\) \(4\) must be >="),
    ],
)
def test_what_cannot_map_fails_at_start_saying_why(env, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_env(env)


def test_every_alias_is_in_the_docs_table():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    table = docs.split("### TGI and LMI environment names", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in ALIASES if f"`{name}`" not in table]
    assert not missing, missing


# ----- SM_NUM_GPUS in the placement -----

FOUR = [Gpu(f"GPU-{i}", 80 * 1024**3) for i in range(4)]


def test_sm_num_gpus_uses_the_first_n_gpus():
    config = ServeConfig.from_env({"SM_NUM_GPUS": "2", "SERVE_GPU_PLACEMENT": "per_gpu"})
    plan = placement.plan_for(config, gpus=FOUR)
    assert (plan.kind, plan.workers) == ("per_gpu", 2)
    assert [plan.worker_env(slot)["CUDA_VISIBLE_DEVICES"] for slot in (0, 1)] == ["GPU-0", "GPU-1"]


def test_sm_num_gpus_narrows_what_shared_and_spread_workers_see():
    spread = placement.plan_for(ServeConfig.from_env({"OPTION_TENSOR_PARALLEL_DEGREE": "3"}), gpus=FOUR)
    assert (spread.kind, spread.worker_env(0)["CUDA_VISIBLE_DEVICES"]) == ("device_map", "GPU-0,GPU-1,GPU-2")
    one = placement.plan_for(ServeConfig.from_env({"SM_NUM_GPUS": "1"}), gpus=FOUR)
    assert (one.kind, one.worker_env(0)["CUDA_VISIBLE_DEVICES"]) == ("shared", "GPU-0")
    assert "SM_NUM_GPUS" in one.reason
    every = placement.plan_for(ServeConfig.from_env({"SM_NUM_GPUS": "4", "SERVE_GPU_PLACEMENT": "device_map"}), FOUR)
    assert "CUDA_VISIBLE_DEVICES" not in every.worker_env(0)  # all of them: nothing to narrow


def test_more_gpus_than_visible_fails_naming_the_alias():
    with pytest.raises(ConfigError, match=r"SM_NUM_GPUS \(= SERVE_NUM_GPUS\)=8 asks for 8 GPU\(s\).* 4 that are"):
        placement.plan_for(ServeConfig.from_env({"SM_NUM_GPUS": "8"}), gpus=FOUR)
    with pytest.raises(ConfigError, match="set by OPTION_TENSOR_PARALLEL_DEGREE"):
        placement.plan_for(ServeConfig.from_env({"OPTION_TENSOR_PARALLEL_DEGREE": "1"}), gpus=[])
