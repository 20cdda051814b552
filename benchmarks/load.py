"""Load and soak: the local stack at increasing concurrency, through the public API and straight at /invocations.

    python benchmarks/load.py [--model DIR] [--api-levels 1,2,4,8,16] [--direct-levels 1,4,16,64,96]
                              [--level-seconds 20] [--soak-seconds 300] [--soak-clients 4] [--no-write]
    python benchmarks/load.py --api-url http://127.0.0.1:3000/prod --invocations-url http://127.0.0.1:8080 ...

Loopback only, and bounded: every level stops after --level-seconds (or --max-requests per level), every
request after --timeout. Without URLs it starts its own stack as processes (stack_runner's Stack): the model
server (gunicorn), the SageMaker runtime endpoint emulator, the Lambda emulator running lambda/ unmodified, and
the API Gateway emulator, with Lambda concurrency = the highest API level (so the function is never throttled,
which API Gateway would turn into a 500, as AWS does).

Per level: requests, throughput (answers/s), p50/p99 latency, and the status mix. Closed loop: each client sends
its next question when the previous one is answered. The anchor is the same model server called directly
(what SageMaker's InvokeEndpoint reaches); the API path's throughput is printed as a ratio of it.
Checks (exit 1 if one fails): no 5xx except explicit 429/503 back-pressure, no request without an answer
(connection error or timeout), no gunicorn worker replaced, and memory flat over the soak (each process's
resident memory at the end within 10 % + 20 MiB of its level after the warm-up minute).
Rewrites only the `load` section of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import write_section

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "reliability.md"
QUESTIONS_FILE = ROOT / "data" / "sample" / "toolkit_faq.jsonl"
ENDPOINT = "faq-assistant"
BACK_PRESSURE = {429, 503}
BACK_OFF_S = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory to serve (default: the embedded SmolLM2-135M)")
    p.add_argument("--api-url", help="an already running public API base, e.g. http://127.0.0.1:3000/prod")
    p.add_argument("--invocations-url", help="an already running model server, e.g. http://127.0.0.1:8080")
    p.add_argument("--api-levels", default="1,2,4,8,16")
    p.add_argument("--direct-levels", default="1,4,16,64,96")
    p.add_argument("--level-seconds", type=float, default=20.0)
    p.add_argument("--max-requests", type=int, default=2000, help="per level, whichever comes first")
    p.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens per question (short answers)")
    p.add_argument("--timeout", type=float, default=60.0, help="per request")
    p.add_argument(
        "--burst-clients", type=int, default=32, help="near-context prompts sent at once to /invocations (0 skips)"
    )
    p.add_argument("--burst-prompt-tokens", type=int, default=3500, help="about this many tokens per burst prompt")
    p.add_argument("--soak-seconds", type=float, default=300.0, help="0 skips the soak")
    p.add_argument("--soak-clients", type=int, default=4)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/reliability.md alone")
    args = p.parse_args(argv)
    for url in (args.api_url, args.invocations_url):
        if url and urllib.parse.urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error(f"{url}: load tests only target loopback")
    args.api_levels = [int(x) for x in args.api_levels.split(",") if x]
    args.direct_levels = [int(x) for x in args.direct_levels.split(",") if x]
    return args


# ----------------------------------------------------------------------------------------------- driving


@dataclass
class Target:
    """Where one kind of request goes: the public API (/ask) or the model server (/invocations)."""

    name: str
    host: str
    port: int
    path: str
    body: Callable[[str], bytes]  # question -> request body

    @classmethod
    def api(cls, base_url: str, new_tokens: int) -> Target:
        url = urllib.parse.urlsplit(base_url)
        body = lambda q: json.dumps({"question": q, "parameters": {"max_new_tokens": new_tokens}}).encode()  # noqa: E731
        return cls("API Gateway -> Lambda -> endpoint", url.hostname, url.port, url.path.rstrip("/") + "/ask", body)

    @classmethod
    def direct(cls, base_url: str, new_tokens: int) -> Target:
        url = urllib.parse.urlsplit(base_url)
        body = lambda q: json.dumps({"inputs": q, "parameters": {"max_new_tokens": new_tokens}}).encode()  # noqa: E731
        return cls("/invocations (direct)", url.hostname, url.port, "/invocations", body)


@dataclass
class Result:
    status: int | str  # an HTTP status, or the exception's name when no answer came back
    seconds: float


@dataclass
class LevelReport:
    target: str
    clients: int
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def answered(self) -> list[Result]:
        return [r for r in self.results if r.status == 200]

    @property
    def throughput(self) -> float:
        return len(self.answered) / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float | None:
        times = sorted(r.seconds for r in self.answered)
        if not times:
            return None
        return times[min(len(times) - 1, round(q * (len(times) - 1)))]

    @property
    def mix(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(str(r.status) for r in self.results).items()))

    @property
    def violations(self) -> list[str]:
        bad = [
            r.status
            for r in self.results
            if not (r.status == 200 or (isinstance(r.status, int) and (r.status < 500 or r.status in BACK_PRESSURE)))
        ]
        return [f"{self.target} x{self.clients}: {s}" for s in sorted(set(map(str, bad)))]


def one_request(target: Target, question: str, timeout: float) -> Result:
    started = time.perf_counter()
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        conn.request("POST", target.path, target.body(question), {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        status = response.status
        if status == 200:
            json.loads(payload)  # an accepted request got a whole, parseable answer
    except (OSError, http.client.HTTPException, ValueError) as e:
        status = type(e).__name__
    finally:
        conn.close()
    return Result(status, time.perf_counter() - started)


def drive(
    target: Target, clients: int, seconds: float, max_requests: int, questions: list[str], timeout: float
) -> LevelReport:
    """`clients` closed-loop clients for `seconds` (or `max_requests` in all), after one uncounted request
    each (so new Lambda environments' cold starts and first batches are not measured)."""
    warmup = [
        threading.Thread(target=one_request, args=(target, questions[i % len(questions)], timeout))
        for i in range(clients)
    ]
    for t in warmup:
        t.start()
    for t in warmup:
        t.join(timeout + 5)
    report = LevelReport(target.name, clients)
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    sent = [0]

    def client(index: int) -> None:
        n = index
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            result = one_request(target, questions[n % len(questions)], timeout)
            n += clients
            with lock:
                report.results.append(result)
            if result.status in BACK_PRESSURE:
                time.sleep(BACK_OFF_S)  # a well-behaved client backs off when told to

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + timeout + 10)
    report.wall_s = time.monotonic() - started
    return report


def burst(target: Target, clients: int, prompt: str, timeout: float) -> LevelReport:
    """`clients` requests with the same long prompt, all sent at once (no warm-up, no back-off): every one must be
    answered or refused (429 queue full, 422 too long), none failed, none failing its neighbours."""
    report = LevelReport(f"{target.name}, near-context burst", clients)
    gate = threading.Barrier(clients)

    def client() -> None:
        gate.wait()
        result = one_request(target, prompt, timeout)
        report.results.append(result)  # list.append is atomic

    started = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout + 10)
    report.wall_s = time.monotonic() - started
    return report


def burst_violations(report: LevelReport) -> list[str]:
    bad = sorted({str(r.status) for r in report.results if r.status not in (200, 422, 429)})
    missing = report.clients - len(report.results)
    return [f"burst: {', '.join(bad)}"] * bool(bad) + [f"burst: {missing} requests got no reply"] * bool(missing)


# --------------------------------------------------------------------------------------------- the stack


def start_stack(model_dir: Path, lambda_concurrency: int):
    """The stack as processes on free loopback ports; returns (Stack, api_url, invocations_url)."""
    from stack_runner.__main__ import Ports, Stack, endpoint_config, start_gateway_path

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ports = Ports(
        web=free(),
        apigw=free(),
        lambda_runtime=free(),
        runtime_emulator=free(),
        serve=free(),
        serve_base=free(),
        s3=free(),
    )
    workdir = Path(tempfile.mkdtemp(prefix="load-stack-"))
    stack = Stack(workdir)
    base = workdir / "endpoint"
    base.mkdir()
    (base / "model").symlink_to(model_dir.resolve(), target_is_directory=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "SAGEMAKER_"))}
    stack.start(
        "serve",
        [sys.executable, str(ROOT / "containers" / "serve" / "serve")],
        {
            **clean,
            "SAGEMAKER_BASE_DIR": str(base),
            "SAGEMAKER_BIND_TO_PORT": str(ports.serve),
            "SERVE_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        },
    )
    stack.wait_healthy("serve", f"http://127.0.0.1:{ports.serve}/ping", 300)
    start_gateway_path(stack, ports, endpoint_config(ports, ab=False), lambda_concurrency=lambda_concurrency)
    return stack, f"http://127.0.0.1:{ports.apigw}/prod", f"http://127.0.0.1:{ports.serve}"


def process_trees(stack) -> dict[str, list[int]]:
    """name -> pids of the process and its children (gunicorn workers, Lambda environments)."""
    import psutil

    trees = {}
    for name, popen in stack.processes:
        try:
            root = psutil.Process(popen.pid)
            trees[name] = [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            trees[name] = []
    return trees


def resident_mib(stack) -> dict[str, float]:
    import psutil

    sizes = {}
    for name, pids in process_trees(stack).items():
        total = 0
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += psutil.Process(pid).memory_info().rss
        sizes[name] = total / 2**20
    return sizes


def gunicorn_workers(stack) -> set[int]:
    import psutil

    popen = dict(stack.processes)["serve"]
    return {c.pid for c in psutil.Process(popen.pid).children()}


# ------------------------------------------------------------------------------------------------ soak


@dataclass
class SoakReport:
    seconds: float
    clients: int
    level: LevelReport
    samples: list[tuple[float, dict[str, float]]]

    def drift(self, warmup_s: float = 60.0) -> dict[str, tuple[float, float, float]]:
        """name -> (MiB after warm-up, MiB at the end, peak MiB)."""
        after = [s for t, s in self.samples if t >= min(warmup_s, self.seconds / 3)] or [self.samples[0][1]]
        out = {}
        for name in self.samples[0][1]:
            out[name] = (after[0][name], self.samples[-1][1][name], max(s[name] for _, s in self.samples))
        return out

    @property
    def violations(self) -> list[str]:
        bad = [
            f"soak: {name} grew {start:.0f} -> {end:.0f} MiB"
            for name, (start, end, _) in self.drift().items()
            if end > start * 1.10 + 20
        ]
        if not self.level.answered:  # a soak that answered nothing proves nothing about memory
            bad.append("soak: no request was answered")
        return bad + self.level.violations


def soak(target: Target, stack, seconds: float, clients: int, questions, timeout: float) -> SoakReport:
    samples: list[tuple[float, dict[str, float]]] = []
    done = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic() - started, resident_mib(stack)))
            done.wait(5.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    level = drive(target, clients, seconds, 10**9, questions, timeout)
    done.set()
    sampler.join()
    samples.append((time.monotonic() - started, resident_mib(stack)))
    return SoakReport(seconds, clients, level, samples)


# ----------------------------------------------------------------------------------------------- report


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def level_table(reports: list[LevelReport], anchor: dict[int, float] | None = None) -> str:
    lines = [
        "| path | clients | requests | answers/s | p50 ms | p99 ms | status mix | vs direct |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in reports:
        ratio = ""
        if anchor and anchor.get(r.clients):
            ratio = f"{r.throughput / anchor[r.clients]:.2f}x"
        mix = ", ".join(f"{k}: {v}" for k, v in r.mix.items())
        lines.append(
            f"| {r.target} | {r.clients} | {len(r.results)} | {r.throughput:.2f} | "
            f"{fmt_ms(r.percentile(0.5))} | {fmt_ms(r.percentile(0.99))} | {mix} | {ratio} |"
        )
    return "\n".join(lines)


def soak_table(report: SoakReport) -> str:
    lines = ["| process (with children) | MiB after warm-up | MiB at the end | peak MiB |", "|---|---:|---:|---:|"]
    for name, (start, end, peak) in report.drift().items():
        lines.append(f"| {name} | {start:.0f} | {end:.0f} | {peak:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    questions = [json.loads(line)["question"] for line in QUESTIONS_FILE.read_text().splitlines() if line.strip()]
    stack = None
    if args.api_url and args.invocations_url:
        api_url, direct_url, model = args.api_url, args.invocations_url, "(given URLs)"
    else:
        model_dir = args.model or _embedded_default_model()
        model = model_dir.name
        print(f"starting the stack with {model_dir} ...", flush=True)
        stack, api_url, direct_url = start_stack(model_dir, max(args.api_levels, default=1))
    api, direct = Target.api(api_url, args.new_tokens), Target.direct(direct_url, args.new_tokens)
    try:
        workers_before = gunicorn_workers(stack) if stack else set()
        one_request(direct, "warm up", args.timeout)
        one_request(api, "warm up", args.timeout)
        direct_reports, api_reports = [], []
        for clients in args.direct_levels:
            direct_reports.append(
                drive(direct, clients, args.level_seconds, args.max_requests, questions, args.timeout)
            )
            print(level_table(direct_reports[-1:]).splitlines()[-1], flush=True)
        bursted = None
        if args.burst_clients:
            # ~1 token per word for this tokenizer's common words: the prompt fills most of the 4,096-token context
            prompt = "Please summarise the following notes. " + "the quick brown fox jumps over it " * (
                args.burst_prompt_tokens // 7
            )
            bursted = burst(direct, args.burst_clients, prompt, args.timeout)
            print(f"burst: {bursted.clients} near-context prompts at once: {bursted.mix}", flush=True)
        anchor = {r.clients: r.throughput for r in direct_reports}
        for clients in args.api_levels:
            api_reports.append(drive(api, clients, args.level_seconds, args.max_requests, questions, args.timeout))
            print(level_table(api_reports[-1:], anchor).splitlines()[-1], flush=True)
        soaked = None
        if args.soak_seconds > 0 and stack:
            print(f"soak: {args.soak_clients} clients through the API for {args.soak_seconds:.0f} s ...", flush=True)
            soaked = soak(api, stack, args.soak_seconds, args.soak_clients, questions, args.timeout)
        workers_after = gunicorn_workers(stack) if stack else set()
    finally:
        if stack:
            stack.stop()

    violations = [v for r in direct_reports + api_reports for v in r.violations]
    if bursted:
        violations += burst_violations(bursted)
    if soaked:
        violations += soaked.violations
    if workers_before != workers_after:
        violations.append(f"gunicorn workers changed: {sorted(workers_before)} -> {sorted(workers_after)}")
    section = render(args, model, direct_reports, api_reports, soaked, violations, bursted)
    print("\n" + section)
    if not args.no_write:
        write_section("load", section, DOCS)
    return 1 if violations else 0


def render(args, model, direct_reports, api_reports, soaked, violations, bursted=None) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} CPUs"
    parts = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu} (load average "
        f"{os.getloadavg()[0]:.1f} at the end, this run included), model `{model}`, {args.new_tokens} new tokens per "
        f"question, {args.level_seconds:.0f} s per level, closed-loop clients. Command: "
        f"`python benchmarks/load.py {' '.join(sys.argv[1:])}`.",
        "",
        level_table(direct_reports),
        "",
        level_table(api_reports, {r.clients: r.throughput for r in direct_reports}),
    ]
    if bursted:
        parts += [
            "",
            f"Near-context burst: {bursted.clients} requests of ~{args.burst_prompt_tokens} prompt tokens sent at once "
            f"to /invocations: status mix {bursted.mix} in {bursted.wall_s:.0f} s (accepted ones answered, the rest "
            f"refused with 429/422; p50 {fmt_ms(bursted.percentile(0.5))} ms, slowest "
            f"{fmt_ms(bursted.percentile(1.0))} ms).",
        ]
    if soaked:
        answered = len(soaked.level.answered)
        parts += [
            "",
            f"Soak: {soaked.clients} clients through the public API for {soaked.seconds:.0f} s: "
            f"{len(soaked.level.results)} requests, {answered} answered, status mix "
            f"{soaked.level.mix}, p50 {fmt_ms(soaked.level.percentile(0.5))} ms, "
            f"p99 {fmt_ms(soaked.level.percentile(0.99))} ms. Resident memory:",
            "",
            soak_table(soaked),
        ]
    parts += [
        "",
        "Checks: "
        + (
            "all held (no 5xx besides 429/503, every request answered, no worker replaced"
            + (", memory flat" if soaked else "")
            + ")."
            if not violations
            else "FAILED: " + "; ".join(violations)
        ),
    ]
    return "\n".join(parts)


def _embedded_default_model() -> Path:
    from trainer.modeling import embedded_model_dir

    return embedded_model_dir()


if __name__ == "__main__":
    sys.exit(main())
