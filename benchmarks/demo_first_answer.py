#!/usr/bin/env python3
"""How long a newcomer waits: from `make demo` to the chat page's first answer, and to the A/B report.

    .venv/bin/python benchmarks/demo_first_answer.py [--write]

Runs `make demo` twice in one go on this machine, each time from the command to an answer through API
Gateway (the path the page takes): as it is now (the training job defers its A/B evaluation, which runs
while the page is up) and as it was (`--hp evaluation=in_job`: the job evaluates base and tuned model before
the page comes up). Each run is stopped with Ctrl-C (SIGINT to its process group) once its report is out.
The venv must exist (`make venv`); the embedded model's one-time conversion counts in the first run when
its cache is cold, and the table says so. `--write` rewrites the `demo` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import machine, write_section
from trainer.modeling import default_cache_dir

REPO = Path(__file__).resolve().parents[1]
ASK_URL = "http://127.0.0.1:3000/prod/ask"
# The report's first line: the runner prints it after a deferred evaluation, the training job logs it in-job.
REPORT_MARKERS = {"deferred": "Before / after fine-tuning", "in_job": "A/B on validation"}
VARIANTS = {
    "deferred": "evaluation after the page (today's make demo)",
    "in_job": "evaluation before the page (`--hp evaluation=in_job`, as make demo did before)",
}


def answered() -> bool:
    request = urllib.request.Request(
        ASK_URL,
        data=json.dumps({"question": "What does make demo do?"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return bool(json.loads(response.read()).get("answer", "").strip())
    except (urllib.error.URLError, OSError, ValueError):
        return False


def run_demo(variant: str, timeout_s: float) -> dict:
    cache_warm = (default_cache_dir() / "SmolLM2-135M-Instruct" / "config.json").exists()
    log = Path(tempfile.mkstemp(prefix=f"demo-{variant}-", suffix=".log")[1])
    started = time.monotonic()
    demo = subprocess.Popen(
        ["make", "demo", f"DEMO_ARGS=--hp evaluation={variant}"],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    first_answer = report = None
    try:
        while time.monotonic() - started < timeout_s and demo.poll() is None:
            if first_answer is None and answered():
                first_answer = time.monotonic() - started
                print(f"  {variant}: first answer after {first_answer:.0f} s", flush=True)
            if report is None and REPORT_MARKERS[variant] in log.read_text(errors="replace"):
                report = time.monotonic() - started
                print(f"  {variant}: A/B report after {report:.0f} s", flush=True)
            if first_answer is not None and report is not None:
                break
            time.sleep(1)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
            demo.wait(timeout=120)
    if first_answer is None:
        raise SystemExit(f"{variant}: no answer within {timeout_s:.0f} s; log: {log}")
    return {"variant": variant, "first_answer_s": first_answer, "report_s": report, "cache_warm": cache_warm}


def render(results: list[dict]) -> str:
    by_variant = {r["variant"]: r for r in results}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()} by `benchmarks/demo_first_answer.py`, the venv made, "
        "both runs in one go. Time from `make demo` to the first answer through API Gateway (the page's path), "
        "and to the before/after report in the terminal.",
        "",
        "| make demo | first answer | A/B report | embedded model cache |",
        "|---|---|---|---|",
    ]
    for r in results:
        report = f"{r['report_s']:.0f} s" if r["report_s"] is not None else "not reached"
        cache = "warm" if r["cache_warm"] else "cold (GGUF converted in this run)"
        lines.append(f"| {VARIANTS[r['variant']]} | **{r['first_answer_s']:.0f} s** | {report} | {cache} |")
    if {"deferred", "in_job"} <= by_variant.keys():
        ratio = by_variant["in_job"]["first_answer_s"] / by_variant["deferred"]["first_answer_s"]
        lines += ["", f"The page answers {ratio:.1f}x sooner with the evaluation after it (target: within 3 minutes)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="deferred,in_job", help="comma-separated: deferred, in_job")
    parser.add_argument("--timeout-s", type=float, default=1200, help="per run")
    parser.add_argument("--write", action="store_true", help="rewrite the demo section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results = [run_demo(v, args.timeout_s) for v in variants]
    text = render(results)
    print("\n" + text)
    if args.write:
        write_section("demo", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
