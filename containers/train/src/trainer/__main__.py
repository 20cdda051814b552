"""Entry point of the training image: `docker run IMAGE train`, or `containers/train/train` without Docker.

    SAGEMAKER_BASE_DIR=/tmp/job containers/train/train       # a local job tree instead of /opt/ml
    SAGEMAKER_BASE_DIR=/tmp/job containers/train/evaluate    # A/B report of a job run with evaluation=deferred
    containers/train/package-base --model MODEL --output base/model.tar.gz   # the A/B test's untuned variant

`train` reads the job from the SageMaker tree, trains, writes the artifact and reports. `evaluate` reads the
same tree and the finished artifact in model/ and writes the before/after report. `package-base` is no job:
it takes its arguments from the command line (see trainer.base_variant) and knows nothing of the tree.
Exit codes: 0 done, 2 bad input (output/failure says what to fix), 143 stopped by SIGTERM (checkpoint saved),
1 internal error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback

from . import launch, sagemaker, tracking
from .config import TrainConfig
from .errors import TrainingInterrupted, UserError
from .modeling import default_cache_dir

log = logging.getLogger("trainer")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["package-base"]:
        return _package_base(argv[1:])
    if argv not in ([], ["train"], ["evaluate"]):
        print(
            f"usage: train | evaluate | package-base --help  (this is the training image; got {' '.join(argv)!r})",
            file=sys.stderr,
        )
        return 2
    _configure_logging()
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    # output/failure is the training job's verdict: an evaluation run afterwards logs its errors instead.
    record_failure = sagemaker.write_failure if argv != ["evaluate"] else log.debug
    try:
        job = sagemaker.read_job()
        config = TrainConfig.from_hyperparameters(job.hyperparameters)
        tracking.check(config, job)  # report_to without its tracking server fails now, not after training
        if argv == ["evaluate"]:
            from .job import evaluate_artifact

            evaluate_artifact(config, job, default_cache_dir(), stop_requested)
            return 0
        if not launch.inside_torchrun():
            sagemaker.clear_failure()
            nproc = launch.processes_per_host(config.nproc_per_node)
            # DeepSpeed sets up its process group from a launcher's environment (else it looks for MPI),
            # so a DeepSpeed job runs under torchrun even as a single process.
            if nproc * job.cluster.num_hosts > 1 or config.deepspeed != "none":
                return _launch_workers(config, job, nproc, stop_requested)
        from .job import run

        try:
            run(config, job, default_cache_dir(), stop_requested)
        finally:
            _leave_process_group()
        return 0
    except UserError as e:
        log.error("%s", e)
        record_failure(f"{type(e).__name__}: {e}")
        return e.exit_code
    except TrainingInterrupted as e:
        log.warning("%s", e)
        record_failure(f"TrainingInterrupted: {e}")
        return e.exit_code
    except Exception as e:
        log.exception("internal error")
        record_failure(f"Framework error: {type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        return 1


def _leave_process_group() -> None:
    """Destroy this rank's process group, if the job made one, before the interpreter exits. Left to exit-time
    destructors, a rank that finished first can abort ("terminate called without an active exception") while the
    main rank still evaluates, failing a job whose training succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _package_base(argv: list[str]) -> int:
    """The base variant for an A/B test (trainer.base_variant); errors are logged, no failure file is written."""
    from .base_variant import package_base, parse_args

    _configure_logging()

    def interrupted(*_):
        raise SystemExit(TrainingInterrupted.exit_code)  # unwinds through package_base: its staging is removed

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        package_base(parse_args(argv), default_cache_dir())
        return 0
    except UserError as e:
        log.error("%s", e)
        return e.exit_code
    except Exception:
        log.exception("internal error")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _launch_workers(config: TrainConfig, job: sagemaker.Job, nproc: int, stop_requested: threading.Event) -> int:
    from .job import load_datasets

    load_datasets(config, job)  # bad data fails here, once, before N processes start
    code = launch.run_torchrun(job.cluster, nproc, stop_requested)
    if stop_requested.is_set():
        sagemaker.write_failure("TrainingInterrupted: stopped by SIGTERM; workers saved a checkpoint to resume from")
        return TrainingInterrupted.exit_code
    if code != 0:
        sagemaker.write_failure(f"Framework error: a training process exited with code {code}; see the job log")
    return code


def _configure_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        force=True,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock", "torch.distributed", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
