"""Experiment tracking (`report_to`): Transformers' own TensorBoard and MLflow callbacks, pointed where the job says.

- `tensorboard`: event files in the job's TensorBoard directory (`Job.tensorboard_dir`, which SageMaker uploads when
  the job has a TensorBoardOutputConfig): training loss, learning rate, and the validation answer loss of
  `eval_steps` as `train/*` and `eval/*` scalars.
- `mlflow`: a run named after the training job in experiment MLFLOW_EXPERIMENT_NAME on the tracking server
  MLFLOW_TRACKING_URI, with the Trainer's arguments as params and the same metrics. A SageMaker managed MLflow
  tracking server is named by its ARN (`arn:aws:sagemaker:...:mlflow-tracking-server/...`), which the
  sagemaker-mlflow plugin resolves and signs for.

At the end the A/B evaluation's results go to the same places (`log_results`). `check` runs before anything
heavy, so a missing tracking URI fails the job at start (exit code 2) instead of after training.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .errors import ConfigError
from .sagemaker import Job

log = logging.getLogger(__name__)

SAGEMAKER_MLFLOW_ARN = "arn:aws:sagemaker:"
RESULTS_PREFIX = "ab/"  # the A/B evaluation's metrics: ab/<set>_<metric>_<base|tuned|delta>


@dataclass(frozen=True)
class Tracking:
    trackers: tuple[str, ...]
    tensorboard_dir: Path
    run_name: str | None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None

    @property
    def tensorboard(self) -> bool:
        return "tensorboard" in self.trackers

    @property
    def mlflow(self) -> bool:
        return "mlflow" in self.trackers


def check(config: TrainConfig, job: Job) -> Tracking:
    """The job's tracking settings; ConfigError when `report_to` asks for what the environment does not give."""
    tracking = Tracking(
        trackers=config.trackers,
        tensorboard_dir=job.tensorboard_dir,
        run_name=job.job_name,
        mlflow_tracking_uri=job.mlflow_tracking_uri,
        mlflow_experiment_name=job.mlflow_experiment_name,
    )
    if tracking.mlflow:
        uri = tracking.mlflow_tracking_uri
        if not uri:
            raise ConfigError(
                "hyperparameter 'report_to' includes mlflow, but the environment variable MLFLOW_TRACKING_URI is not "
                "set: give the training job the tracking server's URI (or a SageMaker managed MLflow tracking "
                "server's ARN) in its environment"
            )
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("hyperparameter 'report_to' includes mlflow, but this image has no mlflow installed")
        if uri.startswith(SAGEMAKER_MLFLOW_ARN) and importlib.util.find_spec("sagemaker_mlflow") is None:
            raise ConfigError(
                "MLFLOW_TRACKING_URI is a SageMaker MLflow ARN, which needs the sagemaker-mlflow plugin; this image "
                "has none installed"
            )
    if tracking.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "hyperparameter 'report_to' includes tensorboard, but this image has no tensorboard installed"
        )
    return tracking


def callbacks(tracking: Tracking) -> list:
    """The Trainer callbacks that report to the trackers (Transformers' own); they log on the main process only."""
    found = []
    if tracking.tensorboard:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(tracking.tensorboard_dir)  # it otherwise reads TENSORBOARD_LOGGING_DIR
        found.append(tensorboard)
    if tracking.mlflow:
        import mlflow
        from transformers.integrations import MLflowCallback

        # Set here rather than left to the callback's own reading of the environment: the same values either way.
        mlflow.set_tracking_uri(tracking.mlflow_tracking_uri)
        if tracking.mlflow_experiment_name:
            try:
                mlflow.set_experiment(tracking.mlflow_experiment_name)
            except mlflow.exceptions.MlflowException as e:
                raise ConfigError(
                    f"MLflow experiment {tracking.mlflow_experiment_name!r} (MLFLOW_EXPERIMENT_NAME) on the tracking "
                    f"server in MLFLOW_TRACKING_URI: {e}"
                ) from e
        found.append(MLflowCallback())
    return found


def mlflow_run_id(tracking: Tracking) -> str | None:
    """The MLflow run the training reported to (the callback ends it when training ends)."""
    if not tracking.mlflow:
        return None
    import mlflow

    run = mlflow.active_run() or mlflow.last_active_run()
    return run.info.run_id if run else None


def results_metrics(table: dict, best: dict | None = None) -> dict[str, float]:
    """The A/B comparison table (trainer.report.comparison) as flat metric names, with the best checkpoint's."""
    metrics = {}
    for set_name, rows in table.items():
        for metric in ("loss", "perplexity", "rouge_l", "exact_match"):
            # With retrieval, the table's third column too (tuned_retrieval, delta_retrieval).
            for side, value in rows[metric].items():
                if value is not None and value == value:  # not missing, not NaN
                    metrics[f"{RESULTS_PREFIX}{set_name}_{metric}_{side}"] = float(value)
        recall = (rows.get("retrieval") or {}).get("recall_at_k")
        if recall is not None:
            metrics[f"{RESULTS_PREFIX}{set_name}_retrieval_recall_at_k"] = float(recall)
    if best:
        metrics["best/eval_loss"] = float(best["eval_loss"])
        metrics["best/step"] = float(best["step"])
    return metrics


def log_results(tracking: Tracking, metrics: dict[str, float], step: int, run_id: str | None) -> str | None:
    """The evaluation's `metrics` at `step`: TensorBoard scalars in the same directory, MLflow metrics on the
    training's run (`run_id`; a new run of the job's name when there is none). Returns the MLflow run id."""
    if not metrics:
        return run_id
    if tracking.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tracking.tensorboard_dir))
        try:
            for name, value in metrics.items():
                writer.add_scalar(name, value, step)
        finally:
            writer.close()
    if tracking.mlflow:
        import mlflow
        from mlflow.entities import Metric

        mlflow.set_tracking_uri(tracking.mlflow_tracking_uri)
        client = mlflow.MlflowClient()
        if run_id is None:
            experiment = mlflow.set_experiment(tracking.mlflow_experiment_name or "Default")
            run_id = client.create_run(experiment.experiment_id, run_name=tracking.run_name).info.run_id
            client.set_terminated(run_id)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(name, value, now, step) for name, value in metrics.items()])
    log.info("evaluation results sent to %s", " and ".join(tracking.trackers))
    return run_id
