"""A short version of benchmarks/load.py against the stack (tiny model): a few seconds per level, a 429 burst
straight at /invocations, and a mini soak. The 5-minute soak is the script's job; its result is in
docs/reliability.md."""

from __future__ import annotations

import pytest
from reliability.helpers import RunningStack, free_ports, started_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """The stack as `python -m stack_runner up` starts it, with the tiny model, on free ports."""
    with started_stack(tmp_path_factory.mktemp("stack"), tiny_model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def load():
    import load as load_benchmark  # benchmarks/load.py; benchmarks/ is on the test path (pyproject.toml)

    return load_benchmark


QUESTIONS = ["What does this toolkit do?", "How do I run the main job?", "Which base model is the default?"]


def test_levels_through_the_api_and_direct_hold(stack, load):
    api = load.Target.api(f"http://127.0.0.1:{stack.ports.apigw}/prod", new_tokens=4)
    direct = load.Target.direct(f"http://127.0.0.1:{stack.ports.serve}", new_tokens=4)
    workers = load.gunicorn_workers(stack.stack)
    reports = [load.drive(target, clients, 2.0, 200, QUESTIONS, 30) for target in (direct, api) for clients in (1, 4)]
    for report in reports:
        assert not report.violations, report.mix
        assert report.answered, report.mix
    assert load.gunicorn_workers(stack.stack) == workers
    assert "| /invocations (direct) | 4 |" in load.level_table(reports)


def test_a_burst_over_the_queue_is_answered_with_429s_not_errors(tmp_path, tiny_model_dir, load):
    small = RunningStack(tmp_path, free_ports())
    try:
        small.start_serving(tiny_model_dir, SERVE_MAX_BATCH_SIZE="2", SERVE_MAX_QUEUE="4", SERVE_MAX_INPUT_TOKENS="512")
        direct = load.Target.direct(f"http://127.0.0.1:{small.ports.serve}", new_tokens=64)
        report = load.drive(direct, 12, 3.0, 300, QUESTIONS, 30)
    finally:
        small.stop()
    assert not report.violations, report.mix
    assert report.mix.get("429") and report.mix.get("200"), report.mix
    assert set(report.mix) <= {"200", "429"}, report.mix


def test_mini_soak_memory_and_answers(stack, load):
    api = load.Target.api(f"http://127.0.0.1:{stack.ports.apigw}/prod", new_tokens=4)
    load.drive(api, 2, 2.0, 200, QUESTIONS, 30)  # warm, whichever test ran first
    soaked = load.soak(api, stack.stack, 8.0, 2, QUESTIONS, 30)
    assert len(soaked.samples) >= 2
    assert set(soaked.drift()) >= {"serve", "runtime-emulator", "lambda", "apigw"}
    # What the script's soak judges: no 5xx, no process's memory growing past the rule, and answers given.
    assert soaked.level.answered, soaked.level.mix
    assert not soaked.violations, (soaked.violations, soaked.drift())


def test_the_soak_rule_flags_growth_and_silence(load):
    """The rule itself, on made-up samples: memory that grows, and a soak where nothing was answered."""
    level = load.LevelReport("api", 2, [load.Result(200, 0.1)], wall_s=1.0)
    flat = [(0.0, {"serve": 500.0}), (30.0, {"serve": 505.0}), (90.0, {"serve": 508.0})]
    grown = [(0.0, {"serve": 500.0}), (30.0, {"serve": 505.0}), (90.0, {"serve": 700.0})]
    assert not load.SoakReport(90.0, 2, level, flat).violations
    assert load.SoakReport(90.0, 2, level, grown).violations == ["soak: serve grew 505 -> 700 MiB"]
    silent = load.LevelReport("api", 2, [load.Result(429, 0.1)], wall_s=1.0)
    assert load.SoakReport(90.0, 2, silent, flat).violations == ["soak: no request was answered"]
