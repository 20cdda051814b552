"""`train --local` and `deploy --local`: sagemaker-core's local mode, fed the requests the real API gets.

sagemaker-core 2.x (the v3 SDK's base package) still ships the classic SDK's local mode in
`sagemaker.core.local`: `LocalSession().sagemaker_client` is a stand-in for the boto3 SageMaker client whose
CreateTrainingJob, CreateModel, CreateEndpointConfig and CreateEndpoint take the same request dicts as the
service, and run the image on this machine with docker compose (`train` or `serve`, SageMaker's /opt/ml layout,
file:// channels mounted, model.tar.gz unpacked at /opt/ml/model). So a local job is the request the dry run
prints, sent to another client: no second description of the job. (The v3 ModelTrainer's own local mode lives in
sagemaker-train, which needs mlflow, whose gunicorn cap clashes with the serving image's pin.)

Nothing here talks to AWS for a local image: telemetry is off, and the session only needs a region.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from llmft_aws.context import UsageError

TELEMETRY_OFF = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}


def local_session(container_root: Path, serving_port: int | None = None, health_check_timeout_s: int | None = None):
    """A LocalSession whose per-job folders (compose file, /opt/ml trees) go under `container_root`."""
    import boto3

    try:
        from sagemaker.core.local.local_session import LocalSession
    except ImportError as e:
        raise UsageError("sagemaker-core is not installed here: run `make venv` (requirements-dev.txt)") from e

    container_root.mkdir(parents=True, exist_ok=True)
    boto_session = boto3.Session(region_name=boto3.Session().region_name or "us-east-1")
    session = LocalSession(boto_session=boto_session, sagemaker_config=TELEMETRY_OFF)
    config = {"container_root": str(container_root)}
    if serving_port is not None:
        config["serving_port"] = serving_port
    session.config = {"local": config}  # validated against the SDK's schema; the runtime client reads the port
    if health_check_timeout_s is not None:
        # The SDK waits local.health_check_timeout for /ping (default 120 s, too short for a big model on a CPU),
        # but its schema does not list the key: it goes into the validated dict afterwards.
        config["health_check_timeout"] = health_check_timeout_s
    return session


def remove_compose_projects(container_root: Path) -> None:
    """The SDK leaves a job's exited containers behind; each job folder's compose file names them."""
    for compose_file in container_root.glob("*/docker-compose.yaml"):
        subprocess.run(
            ["docker", "compose", "-f", str(compose_file), "rm", "--force", "--stop"], capture_output=True, timeout=120
        )
