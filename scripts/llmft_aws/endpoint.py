"""SageMaker real-time endpoint: deploy one or two production variants (A/B), shift traffic, delete.

    scripts/llmft-aws deploy --endpoint faq-assistant --image URI --model-data s3://.../model.tar.gz \
        [--variant base=s3://.../base-model.tar.gz --weights 80 20] [--instance-type ml.g5.xlarge] \
        [--min-instances 1 --max-instances 4 --invocations-per-instance 60]
    scripts/llmft-aws deploy --endpoint faq-tgi --engine tgi --model-data s3://.../model.tar.gz   # AWS's TGI image
    scripts/llmft-aws shift-traffic --endpoint faq-assistant --weight tuned=50 --weight base=50
    scripts/llmft-aws delete --endpoint faq-assistant

boto3 rather than the SDK's ModelBuilder: two variants with their own weights, the container start-up
health-check timeout and autoscaling are plain fields of CreateEndpointConfig and Application Auto Scaling.
`model_request`, `endpoint_config_request` and `endpoint_request` build each request once: `--dry-run` prints
exactly what a real run sends (and `deploy --local` hands the same CreateModel to the local client).
`--engine tgi|lmi` serves the same artifact (a merged Transformers directory) on AWS's own LLM containers
instead of ours; `--model-data` may also be an uncompressed S3 prefix (ending in /), which SageMaker copies
to /opt/ml/model file by file, skipping the unpacking of a large archive.

Every resource is tagged `llmft:endpoint=<name>`, which is how `delete` finds what `deploy` made. Deploy is
safe to re-run: an existing endpoint is updated in place to a new endpoint config (a blue/green swap
SageMaker does without dropping requests).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field

from llmft_aws.context import AwsContext, CommandError, UsageError, log

TAG_KEY = "llmft:endpoint"
NAME_RE = re.compile(r"^[a-z0-9](-*[a-z0-9])*$")
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
# SageMaker allows 60..3600 s for the container's first successful /ping.
MIN_STARTUP_S, MAX_STARTUP_S = 600, 3600

ENGINES = ("llmft", "tgi", "lmi")  # our serving image; AWS's TGI and LMI (DJL Serving) containers
# AWS's images per region come from sagemaker-core's image_uris, which reads the tables the SDK ships
# (sagemaker/core/image_uri_config/huggingface-llm.json and djl-lmi.json: the DLC account and tag per region).
# One pinned version each, so a deploy is reproducible; --image overrides.
ENGINE_IMAGES = {"tgi": ("huggingface-llm", "3.3.6"), "lmi": ("djl-lmi", "0.38.0")}
MODEL_DIR = "/opt/ml/model"  # where SageMaker puts the model data, for every engine


@dataclass(frozen=True)
class Variant:
    name: str
    model_data: str  # s3://.../model.tar.gz, an uncompressed s3://.../prefix/ (file://... in local mode)
    weight: float


@dataclass(frozen=True)
class DeploySpec:
    endpoint: str
    image: str
    role: str
    variants: tuple[Variant, ...]
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    min_instances: int = 1
    max_instances: int = 2
    invocations_per_instance: float = 60.0  # per minute: the target-tracking target
    environment: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    engine: str = "llmft"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"--engine {self.engine!r}: one of {', '.join(ENGINES)}")
        # Lower case on purpose: endpoint ARNs are lower case, and the IaC's IAM policy names the ARN.
        if len(self.endpoint) > 63 or not NAME_RE.match(self.endpoint):
            raise UsageError(f"--endpoint {self.endpoint!r}: use lower-case letters, digits and hyphens (max 63)")
        if not 1 <= len(self.variants) <= 2:
            raise UsageError("deploy takes one or two variants")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise UsageError(f"variant names must differ: {names}")
        for v in self.variants:
            if not re.match(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$", v.name) or len(v.name) > 63:
                raise UsageError(f"variant name {v.name!r}: letters, digits and hyphens only")
            if v.weight < 0:
                raise UsageError(f"variant {v.name}: weight must be >= 0")
            if not v.model_data.startswith(("s3://", "file://")):
                raise UsageError(f"variant {v.name}: model data {v.model_data!r} must be an s3:// (or file://) URI")
            if self.engine != "llmft" and not v.model_data.startswith("s3://"):
                raise UsageError(f"--engine {self.engine} runs on SageMaker only: {v.model_data!r} is not s3://")
        if sum(v.weight for v in self.variants) <= 0:
            raise UsageError("at least one variant needs a weight above 0")
        if not 1 <= self.min_instances <= self.max_instances:
            raise UsageError("need 1 <= --min-instances <= --max-instances")
        if self.invocations_per_instance <= 0:
            raise UsageError("--invocations-per-instance must be > 0")

    @property
    def digest(self) -> str:
        """Short hash of everything a model or endpoint config is made of: new content, new names."""
        fields = asdict(self)
        if self.engine == "llmft":
            del fields["engine"]  # the names deploys made before --engine existed stay the same
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]

    def model_name(self, variant: Variant) -> str:
        return f"{self.endpoint[:40]}-{variant.name[:12].lower()}-{self.digest}"

    @property
    def config_name(self) -> str:
        return f"{self.endpoint[:50]}-{self.digest}"


def startup_timeout_s(model_bytes: int | None) -> int:
    """Container start-up health-check timeout for a model of this (compressed) size.

    Download, unpack and load each take time in proportion to size: 10 minutes, plus 5 minutes per GB,
    within SageMaker's 60..3600 s. An unknown size gets the largest value.
    """
    if model_bytes is None:
        return MAX_STARTUP_S
    return int(min(MAX_STARTUP_S, max(MIN_STARTUP_S, MIN_STARTUP_S + 300 * math.ceil(model_bytes / 1e9))))


def model_size(ctx: AwsContext, uri: str) -> int | None:
    if ctx.dry_run or not uri.startswith("s3://"):
        return None
    bucket, _, key = uri[5:].partition("/")
    s3 = ctx.client("s3")
    try:
        if key.endswith("/"):  # an uncompressed prefix: the sum of its objects
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            return sum(o["Size"] for page in pages for o in page.get("Contents", []))
        return s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception as e:
        log(f"cannot read the size of {uri} ({e}); using the longest start-up timeout")
        return None


def _tags(spec: DeploySpec) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in {**spec.tags, TAG_KEY: spec.endpoint}.items()]


def engine_image(engine: str, region: str) -> str:
    """AWS's TGI or LMI image URI in this region (no network: the SDK's bundled tables)."""
    from sagemaker.core import image_uris

    framework, version = ENGINE_IMAGES[engine]
    try:
        return image_uris.retrieve(framework, region=region, version=version, image_scope="inference")
    except ValueError as e:
        raise UsageError(f"no {engine} image for {region} in sagemaker-core's tables ({e}); pass --image") from e


def gpu_count(instance_type: str, region: str) -> int:
    """GPUs of an ml.* instance type, from the SDK's table; 1 for a type it does not list (--env overrides)."""
    from sagemaker.core import instance_types_gpu_info

    return instance_types_gpu_info.retrieve(region).get(instance_type, {}).get("Count", 1)


def engine_environment(engine: str, gpus: int, max_input_tokens: int, max_total_tokens: int) -> dict[str, str]:
    """What AWS's containers need to serve the model SageMaker put in /opt/ml/model, on all the GPUs.

    TGI's SageMaker entrypoint maps HF_MODEL_ID -> MODEL_ID and SM_NUM_GPUS -> NUM_SHARD (it exits without a
    model id); LMI reads HF_MODEL_ID and OPTION_<X> (serving.properties' option.<x>). Our image needs nothing.
    """
    if engine == "tgi":
        return {
            "HF_MODEL_ID": MODEL_DIR,
            "SM_NUM_GPUS": str(gpus),
            "MAX_INPUT_TOKENS": str(max_input_tokens),
            "MAX_TOTAL_TOKENS": str(max_total_tokens),
        }
    if engine == "lmi":
        return {
            "HF_MODEL_ID": MODEL_DIR,
            "TENSOR_PARALLEL_DEGREE": str(gpus),
            "OPTION_MAX_MODEL_LEN": str(max_total_tokens),
        }
    return {}


def model_data_source(uri: str) -> dict:
    """CreateModel's model data: a model.tar.gz (unpacked by SageMaker) or an uncompressed S3 prefix."""
    if uri.startswith("s3://") and uri.endswith("/"):
        return {
            "ModelDataSource": {"S3DataSource": {"S3Uri": uri, "S3DataType": "S3Prefix", "CompressionType": "None"}}
        }
    return {"ModelDataUrl": uri}


def model_request(spec: DeploySpec, variant: Variant) -> dict:
    """The CreateModel request for one variant."""
    return {
        "ModelName": spec.model_name(variant),
        "ExecutionRoleArn": spec.role,
        "PrimaryContainer": {
            "Image": spec.image,
            **model_data_source(variant.model_data),
            "Environment": dict(spec.environment),
        },
        "Tags": _tags(spec),
    }


def endpoint_config_request(spec: DeploySpec, production_variants: list[dict]) -> dict:
    return {"EndpointConfigName": spec.config_name, "ProductionVariants": production_variants, "Tags": _tags(spec)}


def endpoint_request(spec: DeploySpec) -> dict:
    return {"EndpointName": spec.endpoint, "EndpointConfigName": spec.config_name, "Tags": _tags(spec)}


def create_models(ctx: AwsContext, sm, spec: DeploySpec) -> None:
    for variant in spec.variants:
        name = spec.model_name(variant)
        if not ctx.dry_run and _exists(lambda name=name: sm.describe_model(ModelName=name)):
            log(f"model {name} exists")
            continue
        log(f"creating model {name} ({variant.model_data}, {spec.engine})")
        sm.create_model(**model_request(spec, variant))


def production_variants(ctx: AwsContext, spec: DeploySpec) -> list[dict]:
    """The endpoint config's variants; the start-up timeouts grow with each model's size in S3."""
    variants = []
    for variant in spec.variants:
        timeout = startup_timeout_s(model_size(ctx, variant.model_data))
        variants.append(
            {
                "VariantName": variant.name,
                "ModelName": spec.model_name(variant),
                "InitialInstanceCount": spec.instance_count,
                "InstanceType": spec.instance_type,
                "InitialVariantWeight": variant.weight,
                "ContainerStartupHealthCheckTimeoutInSeconds": timeout,
                "ModelDataDownloadTimeoutInSeconds": timeout,
            }
        )
    return variants


def deploy(ctx: AwsContext, spec: DeploySpec, wait: bool = True) -> str:
    sm = ctx.client("sagemaker")
    create_models(ctx, sm, spec)
    if ctx.dry_run or not _exists(lambda: sm.describe_endpoint_config(EndpointConfigName=spec.config_name)):
        log(f"creating endpoint config {spec.config_name}")
        sm.create_endpoint_config(**endpoint_config_request(spec, production_variants(ctx, spec)))
    current = None if ctx.dry_run else _describe_endpoint(sm, spec.endpoint)
    if current is None:
        log(f"creating endpoint {spec.endpoint}")
        sm.create_endpoint(**endpoint_request(spec))
    elif current["EndpointConfigName"] != spec.config_name:
        log(f"updating endpoint {spec.endpoint} to {spec.config_name}")
        _deregister_autoscaling(ctx, spec.endpoint, [v["VariantName"] for v in current["ProductionVariants"]])
        sm.update_endpoint(EndpointName=spec.endpoint, EndpointConfigName=spec.config_name)
    else:
        log(f"endpoint {spec.endpoint} already runs {spec.config_name}")
    if wait:
        wait_in_service(ctx, sm, spec.endpoint)
        register_autoscaling(ctx, spec)
    else:
        log("not waiting: run deploy again once the endpoint is InService to attach autoscaling")
    arn = f"arn:aws:sagemaker:{ctx.region}:{ctx.account_id()}:endpoint/{spec.endpoint}"
    return arn


def wait_in_service(ctx: AwsContext, sm, endpoint: str, poll_s: float = 30, timeout_s: float = 3600) -> None:
    """Polls with a visible status line (the boto3 waiter is silent for up to an hour)."""
    if ctx.dry_run:
        print(f"[dry-run] wait until sagemaker.describe_endpoint(EndpointName={endpoint!r}) is InService")
        return
    t0 = time.monotonic()
    while True:
        status = sm.describe_endpoint(EndpointName=endpoint)
        state = status["EndpointStatus"]
        log(f"endpoint {endpoint}: {state} after {time.monotonic() - t0:.0f} s")
        if state == "InService":
            return
        if state in ("Failed", "OutOfService", "RollingBack"):
            raise CommandError(f"endpoint {endpoint} is {state}: {status.get('FailureReason', 'no reason given')}")
        if time.monotonic() - t0 > timeout_s:
            raise CommandError(f"endpoint {endpoint} not InService after {timeout_s:.0f} s (still {state})")
        time.sleep(poll_s)


def register_autoscaling(ctx: AwsContext, spec: DeploySpec) -> None:
    """Target tracking on SageMakerVariantInvocationsPerInstance, one scalable target per variant."""
    autoscaling = ctx.client("application-autoscaling")
    for variant in spec.variants:
        resource_id = f"endpoint/{spec.endpoint}/variant/{variant.name}"
        log(
            f"autoscaling {resource_id}: {spec.min_instances}..{spec.max_instances} instances, "
            f"target {spec.invocations_per_instance:g} invocations per instance per minute"
        )
        autoscaling.register_scalable_target(
            ServiceNamespace="sagemaker",
            ResourceId=resource_id,
            ScalableDimension=SCALABLE_DIMENSION,
            MinCapacity=spec.min_instances,
            MaxCapacity=spec.max_instances,
        )
        autoscaling.put_scaling_policy(
            PolicyName=f"{spec.endpoint}-{variant.name}-invocations",
            ServiceNamespace="sagemaker",
            ResourceId=resource_id,
            ScalableDimension=SCALABLE_DIMENSION,
            PolicyType="TargetTrackingScaling",
            TargetTrackingScalingPolicyConfiguration={
                "TargetValue": spec.invocations_per_instance,
                "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                # Scale out fast, in slowly: a model takes minutes to load, a spare instance costs little.
                "ScaleOutCooldown": 60,
                "ScaleInCooldown": 600,
            },
        )


def _deregister_autoscaling(ctx: AwsContext, endpoint: str, variant_names: list[str]) -> None:
    autoscaling = ctx.client("application-autoscaling")
    for name in variant_names:
        resource_id = f"endpoint/{endpoint}/variant/{name}"
        try:
            autoscaling.deregister_scalable_target(
                ServiceNamespace="sagemaker", ResourceId=resource_id, ScalableDimension=SCALABLE_DIMENSION
            )
            log(f"removed autoscaling of {resource_id}")
        except Exception as e:
            if "ObjectNotFound" not in str(e) and "not found" not in str(e).lower():
                raise


def shift_traffic(ctx: AwsContext, endpoint: str, weights: dict[str, float], wait: bool = True) -> None:
    sm = ctx.client("sagemaker")
    if not ctx.dry_run:
        current = _describe_endpoint(sm, endpoint)
        if current is None:
            raise UsageError(f"no endpoint {endpoint} in {ctx.region}")
        known = {v["VariantName"] for v in current["ProductionVariants"]}
        unknown = set(weights) - known
        if unknown:
            raise UsageError(f"endpoint {endpoint} has variants {sorted(known)}, not {sorted(unknown)}")
    if sum(weights.values()) <= 0:
        raise UsageError("at least one weight must be above 0")
    log(f"shifting {endpoint} traffic to " + ", ".join(f"{k}={v:g}" for k, v in weights.items()))
    sm.update_endpoint_weights_and_capacities(
        EndpointName=endpoint,
        DesiredWeightsAndCapacities=[{"VariantName": k, "DesiredWeight": v} for k, v in weights.items()],
    )
    if wait:
        wait_in_service(ctx, sm, endpoint, poll_s=10)


def delete(ctx: AwsContext, endpoint: str) -> list[str]:
    """Deletes the endpoint, its endpoint configs, models and autoscaling: everything tagged for it."""
    sm = ctx.client("sagemaker")
    deleted = []
    current = None if ctx.dry_run else _describe_endpoint(sm, endpoint)
    variants = [v["VariantName"] for v in current["ProductionVariants"]] if current else []
    _deregister_autoscaling(ctx, endpoint, variants)
    if current is not None or ctx.dry_run:
        log(f"deleting endpoint {endpoint}")
        sm.delete_endpoint(EndpointName=endpoint)
        deleted.append(f"endpoint/{endpoint}")
    for kind, lister, key, deleter, arg in (
        (
            "endpoint-config",
            sm.list_endpoint_configs,
            "EndpointConfigs",
            sm.delete_endpoint_config,
            "EndpointConfigName",
        ),
        ("model", sm.list_models, "Models", sm.delete_model, "ModelName"),
    ):
        for name in [] if ctx.dry_run else _tagged(sm, lister, key, arg, endpoint):
            log(f"deleting {kind} {name}")
            deleter(**{arg: name})
            deleted.append(f"{kind}/{name}")
    if ctx.dry_run:
        print(f"[dry-run] then delete every endpoint config and model tagged {TAG_KEY}={endpoint}")
    return deleted


def _tagged(sm, lister, key: str, name_field: str, endpoint: str) -> list[str]:
    """Names of the resources of one kind tagged for this endpoint (names starting with it, then tags)."""
    names, token = [], None
    while True:
        page = lister(NameContains=endpoint, MaxResults=100, **({"NextToken": token} if token else {}))
        for item in page[key]:
            arn = item.get("EndpointConfigArn") or item.get("ModelArn")
            tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn).get("Tags", [])}
            if tags.get(TAG_KEY) == endpoint:
                names.append(item[name_field])
        token = page.get("NextToken")
        if not token:
            return names


def _describe_endpoint(sm, endpoint: str) -> dict | None:
    try:
        return sm.describe_endpoint(EndpointName=endpoint)
    except sm.exceptions.ClientError as e:
        if "Could not find" in str(e) or e.response["Error"]["Code"] in ("ValidationException", "ResourceNotFound"):
            return None
        raise


def _exists(describe) -> bool:
    try:
        describe()
        return True
    except Exception as e:
        if "Could not find" in str(e) or "ValidationException" in str(e) or "does not exist" in str(e):
            return False
        raise
