"""Start a SageMaker training job on our training image: one CreateTrainingJob request, sent with boto3.

    scripts/llmft-aws train --image URI --role ARN --train s3://.../train/ [--validation s3://.../validation/] \
        --output s3://BUCKET/jobs/ [--instance-type ml.g5.2xlarge --instance-count 2] \
        [--hyperparameter max_steps=200 ...] [--spot --max-wait 7200] [--checkpoint s3://BUCKET/checkpoints/faq/]
    scripts/llmft-aws train --local --image sagemaker-llm-finetune-train:local --train data/ --output file:///tmp/out \
        [--model-channel DIR]        # the same request through sagemaker-core's local mode (Docker here)

`training_job_request` builds the request once: `--dry-run` prints it, a real run passes it to
`create_training_job`, `--local` to sagemaker-core's local client (llmft_aws.sagemaker_local). Metric
definitions are the training image's own regexes (containers/train/metric_definitions.json), so the console
charts loss, ROUGE-L and exact match. The job's CloudWatch log streams to stderr until it ends; the last line
on stdout is the `model.tar.gz` URI. A local job talks to nothing outside this machine (telemetry is off).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmft_aws.context import AwsContext, CommandError, UsageError, log

REPO = Path(__file__).resolve().parents[2]
METRIC_DEFINITIONS = REPO / "containers" / "train" / "metric_definitions.json"
# Local mode's instance types: ours (as the v3 SDK names them) -> the local client's.
LOCAL_INSTANCE_TYPES = {"local_cpu": "local", "local_gpu": "local_gpu"}
TERMINAL = ("Completed", "Failed", "Stopped")  # TrainingJobStatus values after which nothing changes


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
    job_name: str = "llmft"  # a prefix: a timestamp is appended, so re-runs never collide
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
        """The job's name: the prefix and the start time, so re-runs never collide."""
        return f"{self.job_name}-{self.started}"


def metric_definitions() -> list[dict[str, str]]:
    return json.loads(METRIC_DEFINITIONS.read_text())


def training_job_request(spec: TrainSpec) -> dict:
    """The CreateTrainingJob request for this spec, in the API's own field names: the one description of the job.

    `--dry-run` prints it, a real run sends it with boto3, `--local` hands it to sagemaker-core's local client.
    """
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
                        # Local mode mounts a file:// channel where SageMaker would download the prefix.
                        "S3Uri": _local_uri(uri) if spec.local else uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
            for name, uri in spec.channels.items()
        ],
        # Local mode writes model.tar.gz straight into this folder; SageMaker adds <job>/output/ itself.
        "OutputDataConfig": {"S3OutputPath": _local_job_dir(spec).as_uri() if spec.local else spec.output},
        "ResourceConfig": {
            "InstanceType": LOCAL_INSTANCE_TYPES[spec.instance_type] if spec.local else spec.instance_type,
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


def model_artifact_uri(spec: TrainSpec) -> str:
    """Where the job's model.tar.gz lands: SageMaker's <output>/<job>/output/, the same folders locally."""
    if spec.local:
        return (_local_job_dir(spec) / "model.tar.gz").as_uri()
    return f"{spec.output.rstrip('/')}/{spec.name}/output/model.tar.gz"


def train(ctx: AwsContext | None, spec: TrainSpec) -> str:
    """Runs the job to the end with its log on stderr; returns the model.tar.gz URI."""
    request = training_job_request(spec)
    if spec.local:
        return _train_local(spec, request)
    sm = ctx.client("sagemaker")
    log(f"starting training job {spec.name} on {spec.instance_count} x {spec.instance_type} ({spec.image})")
    sm.create_training_job(**request)
    if ctx.dry_run:
        return model_artifact_uri(spec)
    try:
        job = wait_for_job(sm, JobLog(ctx.client("logs"), spec.name), spec.name)
    except KeyboardInterrupt:
        log(f"stopped watching; the job goes on: aws sagemaker stop-training-job --training-job-name {spec.name}")
        raise
    if job["TrainingJobStatus"] != "Completed":
        reason = job.get("FailureReason", "no reason given")
        raise CommandError(f"training job {spec.name} ended {job['TrainingJobStatus']}: {reason}")
    return job["ModelArtifacts"]["S3ModelArtifacts"]


def wait_for_job(sm, job_log: JobLog, name: str, poll_s: float = 20) -> dict:
    """Polls DescribeTrainingJob until the job ends, printing status changes and the job's new log lines."""
    last = None
    while True:
        job = sm.describe_training_job(TrainingJobName=name)
        state = (job["TrainingJobStatus"], job.get("SecondaryStatus"))
        if state != last:
            log(f"training job {name}: {state[0]} ({state[1]})")
            last = state
        job_log.print_new()
        if state[0] in TERMINAL:
            return job
        time.sleep(poll_s)


class JobLog:
    """The job's CloudWatch log (/aws/sagemaker/TrainingJobs, one stream per host), printed to stderr as it grows.

    The log is a convenience: if it cannot be read (no permission, not there yet) the job is still watched."""

    GROUP = "/aws/sagemaker/TrainingJobs"

    def __init__(self, logs, job_name: str):
        self.logs = logs
        self.prefix = f"{job_name}/"
        self.start_ms = 0
        self.seen: set[str] = set()
        self.warned = False

    def print_new(self) -> None:
        kwargs = {"logGroupName": self.GROUP, "logStreamNamePrefix": self.prefix, "startTime": self.start_ms}
        try:
            while True:
                page = self.logs.filter_log_events(**kwargs)
                for event in page.get("events", []):
                    if event["eventId"] not in self.seen:
                        self.seen.add(event["eventId"])
                        self.start_ms = max(self.start_ms, event["timestamp"])
                        print(event["message"].rstrip("\n"), file=sys.stderr, flush=True)
                if not page.get("nextToken"):
                    return
                kwargs["nextToken"] = page["nextToken"]
        except Exception as e:
            if "ResourceNotFound" not in str(e) and not self.warned:
                log(f"cannot read the job's log ({e}); still watching its status")
                self.warned = True


def _local_uri(uri: str) -> str:
    return Path(uri.removeprefix("file://")).resolve().as_uri()


def _local_job_dir(spec: TrainSpec) -> Path:
    return Path(spec.output.removeprefix("file://")).resolve() / spec.name / "output"


def _train_local(spec: TrainSpec, request: dict) -> str:
    """The request through sagemaker-core's local client: docker compose runs the image with `train` here."""
    from llmft_aws.sagemaker_local import local_session, remove_compose_projects

    container_root = _local_job_dir(spec).parent / "sagemaker-local"
    log(f"starting local training job {spec.name} ({spec.image}); folders under {container_root}")
    try:
        session = local_session(container_root)
        # The SDK streams the containers' output to stdout; stderr keeps stdout for the one result line.
        with contextlib.redirect_stdout(sys.stderr):
            session.sagemaker_client.create_training_job(**request)
    except UsageError:
        raise
    except Exception as e:
        raise CommandError(f"training job {spec.name} failed: {_local_failure_reason(spec) or e}") from e
    finally:
        remove_compose_projects(container_root)
    artifact = Path(model_artifact_uri(spec).removeprefix("file://"))
    if not artifact.exists():
        raise CommandError(f"training job {spec.name} left no {artifact}")
    return artifact.as_uri()


def _local_failure_reason(spec: TrainSpec) -> str | None:
    """The container's /opt/ml/output/failure, as SageMaker reports it (FailureReason: 1024 characters).

    Local mode packs /opt/ml/output into output.tar.gz next to model.tar.gz, even when the job failed."""
    archive = _local_job_dir(spec) / "output.tar.gz"
    if not archive.exists():
        return None
    with tarfile.open(archive) as tar:
        try:
            member = tar.extractfile("failure")
        except KeyError:
            return None
        return member.read().decode(errors="replace")[:1024].strip() if member else None


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
    parser.add_argument("--job-name", default="llmft", help="job name prefix; a timestamp is appended (default llmft)")
    parser.add_argument("--tag", action="append", metavar="KEY=VALUE", help="repeatable resource tag")
    parser.add_argument(
        "--local", action="store_true", help="run the same request through sagemaker-core's local mode (Docker here)"
    )


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
