"""The serving package's layering: the HTTP side never imports torch (only the engine side does)."""

from __future__ import annotations

import subprocess
import sys

TORCH_FREE = [
    "serve",
    "serve.access_log",
    "serve.adapters",
    "serve.config",
    "serve.detokenizer",
    "serve.errors",
    "serve.generation",
    "serve.json_body",
    "serve.placement",
    "serve.predictor",
    "serve.readiness",
    "serve.routes",
    "serve.schemas",
    "serve.service",
    "serve.stopping",
]


def test_the_http_side_imports_without_torch():
    """create_app must not wait seconds for torch: /ping answers 503 while the loader thread imports it."""
    code = (
        f"import sys\nfor m in {TORCH_FREE!r}: __import__(m)\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
