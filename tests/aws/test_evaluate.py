"""evaluate against the local endpoint emulator with two variants, each a fake serving container.

The CLI talks to the emulator through AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME with unmodified boto3, pins each
variant with TargetVariant, scores with the training image's evaluation code and writes the report.
The fake containers answer "echo: <question>", so references chosen as that echo score exact match 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FAKE_CONTAINER = REPO / "tests" / "local" / "fake_container.py"


@pytest.fixture(scope="module")
def emulator(servers, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("evaluate-emulator")
    ports = {name: servers.free_port() for name in ("tuned", "base", "emulator")}
    for name in ("tuned", "base"):
        servers.start(
            f"fake-{name}",
            [sys.executable, str(FAKE_CONTAINER), "--port", str(ports[name]), "--name", name],
            f"http://127.0.0.1:{ports[name]}/ping",
        )
    config = tmp / "endpoints.json"
    config.write_text(
        json.dumps(
            {
                "invocation_timeout_s": 10,
                "endpoints": {
                    "faq-ab": {
                        "variants": [
                            {"name": "tuned", "url": f"http://127.0.0.1:{ports['tuned']}", "weight": 0.8},
                            {"name": "base", "url": f"http://127.0.0.1:{ports['base']}", "weight": 0.2},
                        ]
                    }
                },
            }
        )
    )
    url = f"http://127.0.0.1:{ports['emulator']}"
    servers.start(
        "emulator",
        [sys.executable, "-m", "runtime_emulator", "--config", str(config)],
        f"{url}/ping",
        env={"RUNTIME_EMULATOR_PORT": str(ports["emulator"])},
    )
    return url


def test_evaluate_scores_both_variants_and_writes_the_ab_report(run_cli, emulator, tmp_path):
    questions = [f"What is feature {i}?" for i in range(6)]
    data = tmp_path / "validation.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "answer": f"echo: {q}" if i % 2 == 0 else "Something else entirely."}) + "\n"
            for i, q in enumerate(questions)
        )
    )
    report_dir = tmp_path / "report"
    result = run_cli(
        "evaluate",
        "--endpoint",
        "faq-ab",
        "--data",
        str(data),
        "--variants",
        "tuned",
        "base",
        "--report",
        str(report_dir),
        env={"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": emulator},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(report_dir / "report.md")

    results = json.loads((report_dir / "results.json").read_text())
    assert set(results["variants"]) == {"tuned", "base"}
    for variant in results["variants"].values():
        assert variant["errors"] == []
        assert variant["answers"] == [f"echo: {q}" for q in questions]
        assert variant["scores"]["exact_match"] == pytest.approx(0.5)
        assert variant["scores"]["rouge_l"] == pytest.approx(0.5)  # 1 on the echoes, 0 on the rest
        assert variant["latency"]["count"] == 6 and variant["latency"]["p50_ms"] > 0
    report = (report_dir / "report.md").read_text()
    assert "| tuned | " in report and "| base | " in report and "![scores](scores.png)" in report
    assert (report_dir / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reports_an_unknown_variant_as_errors_and_fails(run_cli, emulator, tmp_path):
    data = tmp_path / "validation.csv"
    data.write_text("question,answer\nWhat is it?,A thing.\n")
    result = run_cli(
        "evaluate",
        "--endpoint",
        "faq-ab",
        "--data",
        str(data),
        "--variants",
        "canary",
        "--report",
        str(tmp_path / "r"),
        env={"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": emulator},
    )
    assert result.returncode == 1, result.stderr
    errors = json.loads((tmp_path / "r" / "results.json").read_text())["variants"]["canary"]["errors"]
    assert len(errors) == 1 and "canary" in errors[0]


def test_evaluate_scores_with_the_training_images_code(run_cli):
    # The script must not carry its own copy of the metrics: it imports trainer.evaluation.
    source = (REPO / "scripts" / "llmft_aws" / "evaluate.py").read_text()
    assert "from trainer.evaluation import latency_summary, recall, score_answers" in source
    assert "def rouge_l" not in source and "def exact_match" not in source
