"""The SageMaker training contract, and the only module that knows it.

SageMaker starts the container as `docker run IMAGE train` with this tree mounted (see README.md, "The training
image", and docs/docker.md, "How the images meet SageMaker's contract"):

    /opt/ml/input/config/{hyperparameters,inputdataconfig,resourceconfig,checkpointconfig}.json
    /opt/ml/input/data/<channel>/      train (required); validation, paraphrases, documents, model (optional)
    /opt/ml/model/                     -> model.tar.gz
    /opt/ml/output/data/               -> output.tar.gz
    /opt/ml/output/failure             -> FailureReason (first 1024 characters)
    /opt/ml/checkpoints/               <-> CheckpointConfig.S3Uri (spot resume)
    /opt/ml/output/tensorboard/        -> TensorBoardOutputConfig.S3OutputPath (its default LocalPath)

The platform also sets TRAINING_JOB_NAME, and passes the job's Environment map through: MLFLOW_TRACKING_URI and
MLFLOW_EXPERIMENT_NAME, for `report_to=mlflow`, come from there.

`SAGEMAKER_BASE_DIR` moves the root (tests and local runs use a temporary tree). Everything is read
inside functions, never at import time. Other modules get plain paths and dicts from here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, UserError

DEFAULT_BASE_DIR = "/opt/ml"
DEFAULT_MASTER_PORT = 7777  # what SageMaker's own torchrun launchers use
TRAIN_CHANNEL, VALIDATION_CHANNEL, MODEL_CHANNEL = "train", "validation", "model"
# Optional: plain-text / Markdown files for the retrieval index; questions only evaluated (rewordings of training
# questions, in the validation channel's formats), never trained on.
DOCUMENTS_CHANNEL, PARAPHRASES_CHANNEL = "documents", "paraphrases"
FAILURE_REASON_LIMIT = 1024  # characters of output/failure that SageMaker shows as the job's FailureReason
FAILURE_REASON_CUT = " [...]"  # ends a failure reason cut to that limit


@dataclass(frozen=True)
class Cluster:
    """Where this process sits in the job: hosts sorted, master = first host (SageMaker's rule)."""

    hosts: tuple[str, ...] = ("algo-1",)
    current_host: str = "algo-1"
    network_interface: str = "eth0"
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def master_addr(self) -> str:
        return self.hosts[0]


@dataclass(frozen=True)
class Job:
    """A snapshot of everything the platform handed to this container."""

    base_dir: Path
    hyperparameters: dict[str, Any]
    channels: dict[str, Path]
    cluster: Cluster
    checkpoint_dir: Path
    job_name: str | None = None  # TRAINING_JOB_NAME; None outside SageMaker
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None

    @property
    def model_dir(self) -> Path:
        return self.base_dir / "model"

    @property
    def tensorboard_dir(self) -> Path:
        """Where TensorBoard event files go: the default LocalPath of SageMaker's TensorBoardOutputConfig,
        synced to its S3OutputPath while the job runs."""
        return self.base_dir / "output" / "tensorboard"

    @property
    def output_data_dir(self) -> Path:
        return self.base_dir / "output" / "data"

    @property
    def train_dir(self) -> Path:
        return self.channels[TRAIN_CHANNEL]

    @property
    def validation_dir(self) -> Path | None:
        return self.channels.get(VALIDATION_CHANNEL)

    @property
    def model_channel_dir(self) -> Path | None:
        return self.channels.get(MODEL_CHANNEL)

    @property
    def documents_dir(self) -> Path | None:
        return self.channels.get(DOCUMENTS_CHANNEL)

    @property
    def paraphrases_dir(self) -> Path | None:
        return self.channels.get(PARAPHRASES_CHANNEL)


def base_dir(environ: dict[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get("SAGEMAKER_BASE_DIR", DEFAULT_BASE_DIR))


def read_job(environ: dict[str, str] | None = None) -> Job:
    """Read the job's config files and channels. Raises UserError naming what is missing or malformed."""
    environ = os.environ if environ is None else environ
    root = base_dir(environ)
    config_dir = root / "input" / "config"
    hyperparameters = _read_json(config_dir / "hyperparameters.json", default={})
    input_data_config = _read_json(config_dir / "inputdataconfig.json", default={})
    resource_config = _read_json(config_dir / "resourceconfig.json", default={})
    checkpoint_config = _read_json(config_dir / "checkpointconfig.json", default={})
    for name, content in (
        ("hyperparameters.json", hyperparameters),
        ("inputdataconfig.json", input_data_config),
        ("resourceconfig.json", resource_config),
    ):
        if not isinstance(content, dict):
            raise UserError(f"{config_dir / name}: expected a JSON object, got {type(content).__name__}")

    channels = _channels(root / "input" / "data", input_data_config)
    if TRAIN_CHANNEL not in channels:
        raise DataError(
            f"missing required input channel 'train': no directory {root / 'input' / 'data' / TRAIN_CHANNEL}. "
            "Pass your dataset as the 'train' channel (fit({'train': 's3://...'}))."
        )
    return Job(
        base_dir=root,
        hyperparameters=hyperparameters,
        channels=channels,
        cluster=_cluster(resource_config, environ),
        checkpoint_dir=Path(checkpoint_config.get("LocalPath") or root / "checkpoints"),
        job_name=environ.get("TRAINING_JOB_NAME") or None,
        mlflow_tracking_uri=environ.get("MLFLOW_TRACKING_URI") or None,
        mlflow_experiment_name=environ.get("MLFLOW_EXPERIMENT_NAME") or None,
    )


def failure_reason(message: str) -> str:
    """What SageMaker shows of `message` as FailureReason: all of it when it fits in FAILURE_REASON_LIMIT
    characters, else its start, cut to end in FAILURE_REASON_CUT within the limit."""
    if len(message) <= FAILURE_REASON_LIMIT:
        return message
    return message[: FAILURE_REASON_LIMIT - len(FAILURE_REASON_CUT)] + FAILURE_REASON_CUT


def write_failure(message: str, environ: dict[str, str] | None = None) -> Path:
    """Write output/failure once (the first error wins: later ones are consequences).

    SageMaker takes the file's first FAILURE_REASON_LIMIT characters as the job's FailureReason, so the file
    starts with `failure_reason(message)`; a message cut there follows in full, after a blank line, for whoever
    reads the file itself.
    """
    path = base_dir(environ) / "output" / "failure"
    path.parent.mkdir(parents=True, exist_ok=True)
    reason = failure_reason(message)
    try:
        with path.open("x", encoding="utf-8") as f:
            f.write(reason if reason == message else f"{reason}\n\n{message}")
    except FileExistsError:
        pass
    return path


def clear_failure(environ: dict[str, str] | None = None) -> None:
    """A rerun (spot restart) starts clean: the previous attempt's failure is history, not this job's."""
    (base_dir(environ) / "output" / "failure").unlink(missing_ok=True)


def _channels(data_dir: Path, input_data_config: dict[str, Any]) -> dict[str, Path]:
    present = {p.name for p in data_dir.iterdir() if p.is_dir()} if data_dir.is_dir() else set()
    names = set(input_data_config) | present
    channels = {}
    for name in sorted(names):
        path = data_dir / name
        if not path.is_dir():
            mode = input_data_config.get(name, {}).get("TrainingInputMode", "File")
            if mode == "Pipe":
                raise UserError(f"channel '{name}': Pipe input mode is not supported; use File or FastFile")
            raise DataError(f"channel '{name}' is declared in inputdataconfig.json but {path} does not exist")
        channels[name] = path
    return channels


def _cluster(resource_config: dict[str, Any], environ: dict[str, str]) -> Cluster:
    if not resource_config:
        return Cluster(master_port=_master_port(environ))
    hosts = tuple(sorted(resource_config.get("hosts") or []))
    current = resource_config.get("current_host")
    if not hosts or current not in hosts:
        raise UserError(f"resourceconfig.json: current_host {current!r} is not among hosts {list(hosts)}")
    return Cluster(
        hosts=hosts,
        current_host=current,
        network_interface=resource_config.get("network_interface_name", "eth0"),
        master_port=_master_port(environ),
    )


def _master_port(environ: dict[str, str]) -> int:
    value = environ.get("SM_MASTER_PORT", str(DEFAULT_MASTER_PORT))
    try:
        return int(value)
    except ValueError:
        raise UserError(f"SM_MASTER_PORT must be a port number, got {value!r}") from None


def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
