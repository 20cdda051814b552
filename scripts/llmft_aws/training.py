"""Start a SageMaker training job on our training image with the `sagemaker` SDK (v3 ModelTrainer).

    scripts/llmft-aws train --image URI --role ARN --train s3://.../train/ [--validation s3://.../validation/] \
        --output s3://BUCKET/jobs/ [--instance-type ml.g5.2xlarge --instance-count 2] \
        [--hyperparameter max_steps=200 ...] [--spot --max-wait 7200] [--checkpoint s3://BUCKET/checkpoints/faq/]
    scripts/llmft-aws train --local --image sagemaker-llm-finetune-train:local --train data/ --output file:///tmp/out \
        [--model-channel DIR]        # the same job through the SDK's local mode (Docker on this machine)

Metric definitions are the training image's own regexes (containers/train/metric_definitions.json), so the
console charts loss, ROUGE-L and exact match. Logs stream until the job ends; the last line on stdout is the
`model.tar.gz` URI. The SDK's telemetry is switched off: a local job talks to nothing outside this machine.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmft_aws.context import AwsContext, CommandError, UsageError, log

REPO = Path(__file__).resolve().parents[2]
METRIC_DEFINITIONS = REPO / "containers" / "train" / "metric_definitions.json"
TELEMETRY_OFF = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
LOCAL_INSTANCE_TYPES = ("local_cpu", "local_gpu")


@dataclass(frozen=True)
class TrainSpec:
    image: str
    role: str
    channels: dict[str, str]  # channel name -> s3:// URI (or local directory in local mode)
    output: str  # s3://... (or file://... in local mode)
    instance_type: str = "ml.g5.2xlarge"
    instance_count: int = 1
    hyperparameters: dict[str, str] = field(default_factory=dict)
    checkpoint_s3_uri: str | None = None
    spot: bool = False
    max_run_s: int = 24 * 3600
    max_wait_s: int | None = None
    volume_gb: int = 100
    job_name: str = "llmft"  # a prefix: the SDK appends a timestamp, so re-runs never collide
    tags: dict[str, str] = field(default_factory=dict)
    local: bool = False
    started: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S", time.gmtime()))

    def __post_init__(self) -> None:
        if "train" not in self.channels:
            raise UsageError("--train is required: the training data channel")
        if self.instance_count < 1:
            raise UsageError("--instance-count must be >= 1")
        if self.local:
            if self.instance_type not in LOCAL_INSTANCE_TYPES:
                raise UsageError(f"--local runs on {' or '.join(LOCAL_INSTANCE_TYPES)}, not {self.instance_type}")
            if self.spot or self.checkpoint_s3_uri:
                raise UsageError("--spot and --checkpoint need SageMaker: drop them with --local")
            for name, uri in self.channels.items():
                if uri.startswith("s3://"):
                    raise UsageError(f"--local takes local directories as channels; {name} is {uri}")
                if not Path(uri.removeprefix("file://")).is_dir():
                    raise UsageError(f"channel {name}: {uri} is not a directory")
            if not self.output.startswith("file://"):
                raise UsageError("--local writes its output to a file:// URI (e.g. --output file:///tmp/job)")
            return
        if not self.instance_type.startswith("ml."):
            raise UsageError(f"--instance-type {self.instance_type!r} is not a SageMaker instance type (ml.*)")
        for name, uri in [
            *self.channels.items(),
            ("output", self.output),
            ("checkpoint", self.checkpoint_s3_uri or "s3://"),
        ]:
            if not uri.startswith("s3://"):
                raise UsageError(f"{name}: {uri!r} must be an s3:// URI")
        if self.spot:
            max_wait = self.max_wait_s or 2 * self.max_run_s
            if max_wait < self.max_run_s:
                raise UsageError(f"--max-wait ({max_wait} s) must be >= --max-run ({self.max_run_s} s)")
            if not self.checkpoint_s3_uri:
                # Spot capacity can be reclaimed: without checkpoints an interruption restarts from step 0.
                log("warning: --spot without --checkpoint: an interrupted job restarts from scratch")
        elif self.max_wait_s:
            raise UsageError("--max-wait applies to managed spot training only: add --spot")

    @property
    def name(self) -> str:
        """The job's name as the SDK forms it from the prefix (for local mode's folder and the dry run)."""
        return f"{self.job_name}-{self.started}"


def metric_definitions() -> list[dict[str, str]]:
    return json.loads(METRIC_DEFINITIONS.read_text())


def build_trainer(spec: TrainSpec, boto_session=None):
    """The ModelTrainer for this spec. Heavy imports live here so that --help and tests stay fast."""
    try:
        from sagemaker.core.helper.session_helper import Session
    except ImportError as e:
        raise UsageError(
            "the sagemaker SDK is not installed here: run the command through scripts/llmft-aws, "
            "whose venv has it (scripts/requirements.txt)"
        ) from e
    from sagemaker.core.shapes import MetricDefinition
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import (
        CheckpointConfig,
        Compute,
        InputData,
        OutputDataConfig,
        StoppingCondition,
        Tag,
    )
    from sagemaker.train.model_trainer import Mode

    if spec.local:
        from sagemaker.core.local.local_session import LocalSession

        session = LocalSession(boto_session=boto_session, sagemaker_config=TELEMETRY_OFF)
    else:
        session = Session(boto_session=boto_session, sagemaker_config=TELEMETRY_OFF)
    stopping = StoppingCondition(max_runtime_in_seconds=spec.max_run_s)
    if spec.spot:
        stopping = StoppingCondition(
            max_runtime_in_seconds=spec.max_run_s, max_wait_time_in_seconds=spec.max_wait_s or 2 * spec.max_run_s
        )
    local_root = Path(spec.output.removeprefix("file://")) / spec.name if spec.local else None
    trainer = ModelTrainer(
        training_image=spec.image,
        training_mode=Mode.LOCAL_CONTAINER if spec.local else Mode.SAGEMAKER_TRAINING_JOB,
        sagemaker_session=session,
        role=spec.role,
        base_job_name=spec.job_name,
        compute=Compute(
            instance_type=spec.instance_type,
            instance_count=spec.instance_count,
            volume_size_in_gb=spec.volume_gb,
            enable_managed_spot_training=spec.spot or None,
        ),
        stopping_condition=stopping,
        hyperparameters=dict(spec.hyperparameters),
        input_data_config=[
            InputData(channel_name=name, data_source=uri.removeprefix("file://")) for name, uri in spec.channels.items()
        ],
        output_data_config=OutputDataConfig(s3_output_path=spec.output),
        tags=[Tag(key=k, value=v) for k, v in spec.tags.items()] or None,
        **({"local_container_root": str(local_root)} if local_root else {}),
    )
    if spec.checkpoint_s3_uri:
        # The trainer saves to /opt/ml/checkpoints and resumes from it; SageMaker syncs it with S3.
        trainer = trainer.with_checkpoint_config(
            CheckpointConfig(s3_uri=spec.checkpoint_s3_uri, local_path="/opt/ml/checkpoints")
        )
    if not spec.local:
        trainer = trainer.with_metric_definitions(
            [MetricDefinition(name=m["Name"], regex=m["Regex"]) for m in metric_definitions()]
        )
    return trainer


def dry_run_request(spec: TrainSpec) -> dict:
    """The CreateTrainingJob request this spec makes, in the API's own field names (no SDK, no network)."""
    stopping = {"MaxRuntimeInSeconds": spec.max_run_s}
    if spec.spot:
        stopping["MaxWaitTimeInSeconds"] = spec.max_wait_s or 2 * spec.max_run_s
    request = {
        "TrainingJobName": spec.name,
        "AlgorithmSpecification": {
            "TrainingImage": spec.image,
            "TrainingInputMode": "File",
            "MetricDefinitions": metric_definitions(),
        },
        "RoleArn": spec.role,
        "HyperParameters": dict(spec.hyperparameters),
        "InputDataConfig": [
            {
                "ChannelName": name,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
            for name, uri in spec.channels.items()
        ],
        "OutputDataConfig": {"S3OutputPath": spec.output},
        "ResourceConfig": {
            "InstanceType": spec.instance_type,
            "InstanceCount": spec.instance_count,
            "VolumeSizeInGB": spec.volume_gb,
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": spec.spot,
        "Tags": [{"Key": k, "Value": v} for k, v in spec.tags.items()],
    }
    if spec.checkpoint_s3_uri:
        request["CheckpointConfig"] = {"S3Uri": spec.checkpoint_s3_uri, "LocalPath": "/opt/ml/checkpoints"}
    return request


def train(ctx: AwsContext | None, spec: TrainSpec) -> str:
    """Runs the job to the end with logs streaming; returns the model.tar.gz URI."""
    if ctx is not None and ctx.dry_run:
        print("[dry-run] sagemaker.create_training_job " + json.dumps(dry_run_request(spec), indent=2))
        return f"{spec.output.rstrip('/')}/{spec.name}/output/model.tar.gz"
    trainer = build_trainer(spec, boto_session=ctx.session if ctx else None)
    log(
        f"starting training job {spec.job_name}-<timestamp> on {spec.instance_count} x {spec.instance_type} "
        f"({spec.image})"
    )
    try:
        # The SDK streams the job's log to stdout; stderr keeps stdout for the one result line.
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train(wait=True, logs=True)
    except Exception as e:
        reason = _local_failure_reason(Path(trainer.local_container_root)) if spec.local else None
        raise CommandError(f"training job {spec.name} failed: {reason or e}") from e
    finally:
        if spec.local:
            _remove_local_containers(Path(trainer.local_container_root))
    if spec.local:
        # The SDK's local mode gathers every host's /opt/ml/model into this one archive.
        artifact = Path(trainer.local_container_root) / "compressed_artifacts" / "model.tar.gz"
        if not artifact.exists():
            raise CommandError(f"training job {spec.name} left no {artifact}")
        return artifact.as_uri()
    job = trainer._latest_training_job  # the SDK keeps no public handle on the job it started
    job.refresh()
    if job.training_job_status != "Completed":
        raise CommandError(
            f"training job {job.training_job_name} ended {job.training_job_status}: "
            f"{getattr(job, 'failure_reason', '')}"
        )
    return job.model_artifacts.s3_model_artifacts


def _local_failure_reason(root: Path) -> str | None:
    """The container's /opt/ml/output/failure, as SageMaker would report it (FailureReason: 1024 chars)."""
    failure = root / "artifacts" / "output" / "failure"
    return failure.read_text(errors="replace")[:1024].strip() if failure.exists() else None


def _remove_local_containers(root: Path) -> None:
    """The SDK leaves the job's exited containers behind; its compose file names them, so compose removes them."""
    compose_file = root / "docker-compose.yaml"
    if compose_file.exists():
        subprocess.run(
            ["docker", "compose", "-f", str(compose_file), "rm", "--force", "--stop"], capture_output=True, timeout=120
        )


def parse_pairs(pairs: list[str] | None, what: str) -> dict[str, str]:
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {pair!r}: use KEY=VALUE")
        result[key] = value
    return result


def add_arguments(parser) -> None:
    parser.add_argument(
        "--image", required=True, help="training image URI (from push-images; with --local a local tag)"
    )
    parser.add_argument(
        "--role", help="the job's SageMaker role ARN (default: SAGEMAKER_TRAINING_ROLE_ARN, else SAGEMAKER_ROLE_ARN)"
    )
    parser.add_argument("--train", required=True, help="train channel: s3:// prefix (with --local: a directory)")
    parser.add_argument("--validation", help="validation channel (optional)")
    parser.add_argument("--model-channel", help="base model as the `model` channel (optional; default: the image's)")
    parser.add_argument("--output", required=True, help="s3:// prefix for job output (with --local: file://DIR)")
    parser.add_argument("--instance-type", help="ml.* instance type (default ml.g5.2xlarge; --local: local_cpu)")
    parser.add_argument("--instance-count", type=int, default=1, help="instances (more than 1: multi-node)")
    parser.add_argument(
        "--hyperparameter",
        "-H",
        action="append",
        metavar="KEY=VALUE",
        help="repeatable; see containers/train/src/trainer/config.py for the names",
    )
    parser.add_argument("--checkpoint", help="s3:// URI that /opt/ml/checkpoints syncs with (resume, spot)")
    parser.add_argument("--spot", action="store_true", help="managed spot training (up to ~70%% cheaper)")
    parser.add_argument("--max-run", type=int, default=24 * 3600, help="max training seconds (default 1 day)")
    parser.add_argument(
        "--max-wait", type=int, help="with --spot: max seconds incl. waiting for capacity (default 2 x --max-run)"
    )
    parser.add_argument("--volume-gb", type=int, default=100, help="EBS volume per instance (default 100)")
    parser.add_argument(
        "--job-name", default="llmft", help="job name prefix; the SDK appends a timestamp (default llmft)"
    )
    parser.add_argument("--tag", action="append", metavar="KEY=VALUE", help="repeatable resource tag")
    parser.add_argument("--local", action="store_true", help="run through the SDK's local mode on this machine")


def spec_from_args(args, role: str) -> TrainSpec:
    channels = {"train": args.train}
    if args.validation:
        channels["validation"] = args.validation
    if args.model_channel:
        channels["model"] = args.model_channel
    return TrainSpec(
        image=args.image,
        role=role,
        channels=channels,
        output=args.output,
        instance_type=args.instance_type or ("local_cpu" if args.local else "ml.g5.2xlarge"),
        instance_count=args.instance_count,
        hyperparameters=parse_pairs(args.hyperparameter, "--hyperparameter"),
        checkpoint_s3_uri=args.checkpoint,
        spot=args.spot,
        max_run_s=args.max_run,
        max_wait_s=args.max_wait,
        volume_gb=args.volume_gb,
        job_name=args.job_name,
        tags=parse_pairs(args.tag, "--tag"),
        local=args.local,
    )
