"""The serving app. gunicorn runs `serve:create_app()` in each worker (see containers/serve/serve)."""

from __future__ import annotations

import logging
import sys

from flask import Flask

__all__ = ["create_app"]


def create_app(config=None, predictor=None) -> Flask:
    """Build the app. With no predictor, this worker loads the model from config.model_dir in the background
    (so /ping answers 503 at once while it loads); tests inject a loaded or fake predictor instead."""
    from serve import access_log
    from serve.config import ServeConfig
    from serve.errors import register_error_handlers
    from serve.predictor import Predictor
    from serve.routes import bp

    config = config or ServeConfig.from_env()
    _configure_logging()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_payload_bytes
    if predictor is None:
        predictor = Predictor(config)
        predictor.start_loading()
    app.extensions["serve.predictor"] = predictor
    register_error_handlers(app)
    app.register_blueprint(bp)
    access_log.install(app)
    logging.getLogger("serve").info("starting with %s", config)
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
