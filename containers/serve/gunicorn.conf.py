"""gunicorn settings for the model server; every value comes from ServeConfig (serve/config.py).

Shape: N worker processes, each loading its own model after the fork (CUDA cannot survive a fork, and a
preloaded model would block the first /ping): SAGEMAKER_MODEL_SERVER_WORKERS of them with no GPU or one;
with several GPUs, one per GPU or one for all of them (SERVE_GPU_PLACEMENT, decided in serve/placement.py).
Nothing here, in the master, imports torch or touches CUDA. Workers are gthread: one thread per in-flight
request, so /ping gets its own thread and answers in milliseconds while generations run; the model itself
runs on the engine's single background thread.

Each worker holds a slot, 0 .. workers-1, chosen in the master (pre_fork): a worker that dies is replaced in
its slot, so the replacement gets the same GPU. Workers mark their health on a ReadyBoard (serve/readiness.py)
whose directory the master makes; /ping is 200 only when every slot's worker serves.

Prometheus (GET /metrics, serve/metrics.py): workers write their samples to files in $PROMETHEUS_MULTIPROC_DIR,
a fresh directory the master makes (unless you set one) before forking them, so any worker reports the whole
server; a worker's live gauges are dropped when it exits. The master never imports prometheus_client: it picks
its storage when first imported, and workers would inherit the master's choice.
"""

import glob
import os
import shutil
import signal
import sys
import tempfile
import time

from serve import placement
from serve.config import ServeConfig, WorkerSlot
from serve.readiness import ReadyBoard

_config = ServeConfig.from_env()
_plan = placement.plan_for(_config)

bind = f"{_config.host}:{_config.port}"
workers = _plan.workers
worker_class = "gthread"
threads = _config.threads_per_worker
# gthread's timeout is a heartbeat of the worker's event loop, not a cap on a request; requests are cut
# by the engine at the generation budget (SAGEMAKER_MODEL_SERVER_TIMEOUT minus a margin) instead.
timeout = _config.timeout_s
graceful_timeout = _config.graceful_timeout_s
keepalive = 5
preload_app = False
accesslog = None  # the app writes structured JSON access lines itself
errorlog = "-"
loglevel = "info"
# Large enough that kept-alive connections never starve new ones.
worker_connections = threads * 2
# No management socket in $HOME: nothing uses it, and two servers on one machine would share its path.
control_socket_disable = True


def on_starting(server):
    """Master, once: say where the workers go, and make the directories where they mark themselves ready and
    keep their Prometheus samples."""
    for notice in _config.notices:  # the TGI / LMI env names read (serve/config.py ALIASES)
        server.log.info("%s", notice)
    server.serve_ready = ReadyBoard.create(_plan.workers)
    server.log.info("worker placement: %s; readiness in %s", _plan.reason, server.serve_ready.directory)
    server.serve_metrics_dir = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # yours: it must start empty (prometheus_client's rule)
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    else:
        server.serve_metrics_dir = tempfile.mkdtemp(prefix="serve-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = server.serve_metrics_dir


def pre_fork(server, worker):
    """Master: the new worker's slot, the lowest one no live worker holds."""
    worker.serve_slot = placement.claim_slot(_plan.workers, [w.serve_slot for w in server.WORKERS.values()])


def post_fork(server, worker):
    """The new worker, before the app (and torch) loads in it: its GPU(s) and its slot, as env vars."""
    os.environ.update(_plan.worker_env(worker.serve_slot))
    os.environ.update(WorkerSlot(worker.serve_slot, _plan.workers, server.serve_ready.directory).env())


def child_exit(server, worker):
    """Master, once a worker has exited: its slot is loading until its replacement's model is ready."""
    server.serve_ready.clear(worker.serve_slot, worker.pid)
    # prometheus_client's multiprocess.mark_process_dead, without importing it here: the dead worker's live
    # gauges (its queue depth) leave the sum; its counters and histograms stay, as they should.
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for mode in ("liveall", "livesum", "livemax", "livemin", "livemostrecent"):
        for path in glob.glob(os.path.join(directory, f"gauge_{mode}_{worker.pid}.db")):
            os.remove(path)


def on_exit(server):
    server.serve_ready.remove()
    if server.serve_metrics_dir:
        shutil.rmtree(server.serve_metrics_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def post_worker_init(worker):
    """On SIGTERM, first tell the engine to finish everything before the drain window closes."""
    original = worker.handle_exit

    def handle_exit(sig, frame):
        predictor = getattr(worker.wsgi, "extensions", {}).get("serve.predictor")
        if predictor is not None:
            predictor.shutdown(drain_s=max(1.0, _config.graceful_timeout_s - 3.0))
        worker.log.info("SIGTERM: draining in-flight requests (at most %d s)", _config.graceful_timeout_s)
        original(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)
    worker.started_at = time.monotonic()
    # The engine thread runs Python between its torch ops; with the default 5 ms GIL switch interval a
    # /ping thread can wait 5 ms at each of its few GIL handoffs. 1 ms keeps /ping in single milliseconds.
    sys.setswitchinterval(0.001)
