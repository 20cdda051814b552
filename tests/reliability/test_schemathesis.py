"""Schema-driven fuzzing (schemathesis) of the two HTTP APIs, from their checked-in OpenAPI descriptions, against
real servers on loopback: the model server (gunicorn, tiny model) and the public API (API Gateway emulator ->
Lambda emulator -> endpoint emulator -> that server). Bounded: a few dozen examples per operation and phase."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from reliability.helpers import REPO

pytestmark = pytest.mark.slow

SERVE_SCHEMA = REPO / "containers" / "serve" / "openapi.yaml"
PUBLIC_SCHEMA = REPO / "lambda" / "openapi.yaml"
CONFIG = Path(__file__).with_name("schemathesis.toml")
# Every response must be declared (status, content type, body schema); no 5xx at all (nothing here is
# overloaded or down); requests the schema forbids must be refused (with the statuses in schemathesis.toml).
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)


def schemathesis(schema, url: str, tmp_path, *extra: str, max_examples: int = 40) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", str(schema), "--url", url,
        "--checks", CHECKS, "--max-examples", str(max_examples), "--seed", "7", "--workers", "1",
        "--request-timeout", "30", "--max-time", "25", "--phases", "examples,fuzzing",
        "--report", "junit", "--report-dir", str(tmp_path), "--no-color", *extra,
    ]  # fmt: skip
    # In tmp_path: the CLI keeps its state in .schemathesis/ under the working directory.
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    summary = re.search(r"\d+ generated[^\n]*", result.stdout)
    print(f"schemathesis {schema.relative_to(REPO)}: {summary.group(0) if summary else result.stdout[-500:]}")
    return result


def test_model_server_invocations(stack, tmp_path):
    result = schemathesis(SERVE_SCHEMA, f"http://127.0.0.1:{stack.ports.serve}", tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_public_api_through_api_gateway_and_lambda(stack, tmp_path):
    result = schemathesis(
        PUBLIC_SCHEMA,
        f"http://127.0.0.1:{stack.ports.apigw}/prod",
        tmp_path,
        "--header",
        "Origin: http://127.0.0.1:8000",
        max_examples=30,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
