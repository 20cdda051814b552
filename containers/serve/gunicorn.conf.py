"""gunicorn settings for the model server; every value comes from ServeConfig (serve/config.py).

Shape: N worker processes (SAGEMAKER_MODEL_SERVER_WORKERS), each loading its own model after the fork
(CUDA cannot survive a fork, and a preloaded model would block the first /ping). Workers are gthread:
one thread per in-flight request, so /ping gets its own thread and answers in milliseconds while
generations run; the model itself runs on the engine's single background thread.
"""

import signal
import sys
import time

from serve.config import ServeConfig

_config = ServeConfig.from_env()

bind = f"{_config.host}:{_config.port}"
workers = _config.workers
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
