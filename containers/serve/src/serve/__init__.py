"""The serving app. gunicorn runs `serve:create_app()` in each worker (see containers/serve/serve)."""

from __future__ import annotations

import logging
import os
import sys

from flask import Flask

__all__ = ["create_app"]


def create_app(config=None, predictor=None, ready_board=None) -> Flask:
    """Build the app. With no predictor, this worker loads the model from config.model_dir in the background
    (so /ping answers 503 at once while it loads); tests inject a loaded or fake predictor instead.

    Under gunicorn.conf.py the worker holds a slot (serve.config.WorkerSlot): it publishes its health on the
    server's ReadyBoard, and /ping answers 200 only when every worker's model serves. Tests may inject the board.
    """
    from serve import access_log, metrics
    from serve.config import ServeConfig, WorkerSlot
    from serve.errors import register_error_handlers
    from serve.openai_routes import bp as openai_bp
    from serve.predictor import Predictor
    from serve.readiness import ReadyBoard
    from serve.routes import bp

    config = config or ServeConfig.from_env()
    slot = WorkerSlot.from_env()
    _configure_logging()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_payload_bytes
    if predictor is None:
        predictor = Predictor(config)
        predictor.start_loading()
    if slot is not None:
        ready_board = ready_board or ReadyBoard(slot.ready_dir, slot.slots)
        ready_board.publish(slot.index, lambda: (predictor.state, predictor.health()))
        logging.getLogger("serve").info(
            "worker slot %d of %d: CUDA_VISIBLE_DEVICES=%s, SERVE_GPU_PLACEMENT=%s",
            slot.index,
            slot.slots,
            os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
            config.gpu_placement,
        )
    app.extensions["serve.predictor"] = predictor
    app.extensions["serve.ready_board"] = ready_board
    register_error_handlers(app)
    app.register_blueprint(bp)
    app.register_blueprint(openai_bp)
    access_log.install(app)
    metrics.install(app, config)
    logging.getLogger("serve").info("starting with %s", config)
    for notice in config.notices if slot is None else ():  # under gunicorn, its master logs them once
        logging.getLogger("serve.config").info(notice)
    return app


def _configure_logging() -> None:
    """Our loggers write to stderr (gunicorn's error log); access lines are bare JSON. Lines carry the
    worker's pid, as gunicorn's own do, so several workers' loads and failures can be told apart."""
    root = logging.getLogger("serve")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    access = logging.getLogger("serve.access")
    access_handler = logging.StreamHandler(sys.stderr)
    access_handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(access_handler)
    access.propagate = False
