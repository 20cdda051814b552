"""Serving benchmark: our server vs a one-request-at-a-time `model.generate`, side by side in one run; and on a
CPU, our server's llama.cpp engine vs llama.cpp itself (llama-cpp-python) on the same GGUF.

    python benchmarks/serve_throughput.py [--model DIR] [--new-tokens 128] [--clients 8] [--no-write]

Anchor: what a simple Flask server does per request, a plain greedy `model.generate` (batch 1), run
in this process before the server starts. Ours: `containers/serve/serve` (gunicorn, one worker) on a
loopback port, with N clients posting at once. Both sides get the same raw-text prompts, the same
greedy decoding and the same end tokens, and tokens/s counts the tokens actually generated.
Also measured: time to first token (50-token prompt, no other load), /ping latency while the N
generations run, start-to-first-200, and the worker's peak resident memory.

The llama.cpp part (unless --gguf none): the model written as GGUF by the training image's own export
(trainer.gguf_export, `--gguf q8_0` by default); anchor: llama-cpp-python's `Llama` on that file, one stream at a
time, greedy, as many threads as cores; ours: the same server with SERVE_ENGINE=llamacpp, one client at a time
and N at once, and its time to first token. Against the transformers engine's N-client figure of the same run.
Then N clients again on the other GGUFs of --more-ggufs (q4_0: 4-bit, which llama.cpp repacks for AVX2).
Rewrites the `serve` and `serve-llamacpp` sections of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import with_gguf, write_section

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "containers" / "serve" / "serve"


def embedded_default_model() -> Path:
    """SmolLM2-135M-Instruct as a Transformers directory, converted once by the trainer's own code."""
    from trainer.modeling import embedded_model_dir

    return embedded_model_dir()


PROMPTS = [
    "The history of cloud computing begins with",
    "Amazon SageMaker is a managed service that lets teams",
    "To fine-tune a small language model on a laptop, first",
    "The main difference between batch inference and real-time inference is",
    "A good health check for a web service should",
    "When a model server receives many requests at once, it",
    "The steps to deploy a machine learning model are",
    "Continuous batching improves throughput because",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a Transformers model directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2, help="each client sends these back to back")
    parser.add_argument("--baseline-requests", type=int, default=4, help="sequential generate calls to time")
    parser.add_argument("--ttft-samples", type=int, default=10)
    parser.add_argument(
        "--gguf",
        default="q8_0",
        choices=("none", "q8_0", "q4_k_m", "q4_0"),
        help="the llama.cpp part's GGUF (none: skip it)",
    )
    parser.add_argument(
        "--more-ggufs",
        default="q4_0",
        help="other GGUFs to time the llama.cpp engine on with N clients, comma-separated ('' for none)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--llamacpp-anchor", type=Path, help=argparse.SUPPRESS)  # the anchor's own process
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.model is None:
        args.model = embedded_default_model()
    if args.llamacpp_anchor:
        print(json.dumps(measure_llamacpp_anchor(args.llamacpp_anchor, args)))
        return
    # `serve` sets this (see there); the anchor gets the same runtime setting, before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_before = os.getloadavg()
    baseline, static = measure_baseline(args)
    print(
        f"baseline: {baseline['tokens_per_s']:.1f} tokens/s; static batch {static['tokens_per_s']:.1f}",
        flush=True,
    )
    with Server(args.model, engine="transformers") as server:
        print(f"start to first 200: {server.startup_s:.1f} s", flush=True)
        server.generate(PROMPTS[0], 8)  # warm-up
        ttft = measure_ttft(server, args)
        args.idle_ping_p99_ms = ping_p99(server, 200)
        print(f"TTFT p50: {ttft * 1000:.0f} ms", flush=True)
        ours = measure_concurrent(server, args)
        print(f"ours: {ours['tokens_per_s']:.1f} tokens/s, /ping p99 {ours['ping_p99_ms']:.1f} ms", flush=True)
        rss = server.peak_rss_mib()
    ratio = ours["tokens_per_s"] / baseline["tokens_per_s"]
    print(f"ratio: {ratio:.2f}x")
    section = render(args, baseline, static, ours, ttft, server.startup_s, rss, ratio, load_before)
    print(section)
    if not args.no_write:
        write_section("serve", section)
    if args.gguf != "none":
        llama_section = measure_llamacpp(args, ours, load_before)
        print(llama_section)
        if not args.no_write:
            write_section("serve-llamacpp", llama_section)


def llamacpp_anchor_process(gguf: Path, args) -> dict:
    """The llama.cpp anchor in a process of its own, with OpenMP's default wait policy: this one runs PASSIVE (for
    the transformers anchor, as `serve` runs it), which would slow llama.cpp down (see containers/serve/serve)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    command = [sys.executable, __file__, "--model", str(args.model), "--llamacpp-anchor", str(gguf)]
    command += ["--new-tokens", str(args.new_tokens), "--baseline-requests", str(args.baseline_requests)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_llamacpp_anchor(gguf: Path, args) -> dict:
    """llama.cpp's own single-stream speed: llama-cpp-python's Llama, the same token ids, greedy, until the
    model's end token or the token budget."""
    import llama_cpp
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), verbose=False
    )
    llm.create_completion(tokenizer("warm up").input_ids, max_tokens=4, temperature=0.0)
    tokens, elapsed = 0, 0.0
    for prompt in PROMPTS[: args.baseline_requests]:
        llm.reset()
        started = time.perf_counter()
        out = llm.create_completion(tokenizer(prompt).input_ids, max_tokens=args.new_tokens, temperature=0.0)
        elapsed += time.perf_counter() - started
        tokens += out["usage"]["completion_tokens"]
    llm.close()
    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed}


def measure_single_client(server: Server, args) -> dict:
    tokens, elapsed = 0, 0.0
    for prompt in PROMPTS[: args.baseline_requests]:
        started = time.perf_counter()
        tokens += server.generate(prompt, args.new_tokens)["details"]["generated_tokens"]
        elapsed += time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed}


def measure_llamacpp(args, transformers_clients: dict, load_before) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = with_gguf(args.model, args.gguf, Path(tmp))
        entry = json.loads((model_dir / "manifest.json").read_text())["gguf"]
        anchor = llamacpp_anchor_process(model_dir / entry["file"], args)
        print(f"llama.cpp anchor: {anchor['tokens_per_s']:.1f} tokens/s", flush=True)
        with Server(args.model, engine="transformers") as server:
            server.generate(PROMPTS[0], 8)
            transformers_single = measure_single_client(server, args)
        with Server(model_dir, engine="llamacpp") as server:
            server.generate(PROMPTS[0], 8)
            single = measure_single_client(server, args)
            ttft = measure_ttft(server, args)
            clients = measure_concurrent(server, args)
            rss = server.peak_rss_mib()
            startup_s = server.startup_s
    print(f"llamacpp engine: 1 client {single['tokens_per_s']:.1f}, {args.clients} {clients['tokens_per_s']:.1f}")
    more = measure_more_ggufs(args)
    table = render_llamacpp(
        args,
        entry,
        anchor,
        single,
        clients,
        ttft,
        transformers_single,
        transformers_clients,
        rss,
        startup_s,
        load_before,
    )
    return table + render_more_ggufs(args, more, entry, clients, ttft, transformers_clients)


def measure_more_ggufs(args) -> list[dict]:
    """N clients on each GGUF of --more-ggufs, each exported as the training image writes it."""
    runs = []
    for quantization in [q for q in args.more_ggufs.split(",") if q]:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = with_gguf(args.model, quantization, Path(tmp))
            entry = json.loads((model_dir / "manifest.json").read_text())["gguf"]
            with Server(model_dir, engine="llamacpp") as server:
                server.generate(PROMPTS[0], 8)
                clients = measure_concurrent(server, args)
                ttft = measure_ttft(server, args)
        print(f"llamacpp engine on {quantization}: {args.clients} clients {clients['tokens_per_s']:.1f}")
        runs.append({"gguf": quantization, "bytes": entry["bytes"], "clients": clients, "ttft": ttft})
    return runs


def render_more_ggufs(args, runs: list[dict], default_entry: dict, default_clients: dict, default_ttft, theirs) -> str:
    if not runs:
        return ""
    base = theirs["tokens_per_s"]
    lines = [
        "",
        "",
        f"The same {args.clients} clients on the other GGUFs training writes (`gguf_quantization`), same run, against "
        "the transformers engine's figure above (target >= 2.5x, TTFT p50 <= 150 ms):",
        "",
        f"| GGUF | size | output tokens/s, {args.clients} clients | vs transformers engine | TTFT p50 |",
        "|---|---:|---:|---:|---:|",
        f"| {args.gguf} (default) | {default_entry['bytes'] / 1e6:.0f} MB | {default_clients['tokens_per_s']:.1f} | "
        f"{default_clients['tokens_per_s'] / base:.2f}x | {default_ttft * 1000:.0f} ms |",
    ]
    for run in runs:
        rate = run["clients"]["tokens_per_s"]
        lines.append(
            f"| {run['gguf']} | {run['bytes'] / 1e6:.0f} MB | {rate:.1f} | **{rate / base:.2f}x** | "
            f"{run['ttft'] * 1000:.0f} ms |"
        )
    return "\n".join(lines)


def render_llamacpp(
    args, entry, anchor, single, clients, ttft, transformers_single, transformers_clients, rss, startup_s, load_before
) -> str:
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def cell(run: dict) -> str:
        return f"{run['tokens_per_s']:.1f} ({run['tokens']} tokens in {run['seconds']:.1f} s)"

    single_ratio = single["tokens_per_s"] / anchor["tokens_per_s"]
    clients_ratio = clients["tokens_per_s"] / transformers_clients["tokens_per_s"]
    import llama_cpp

    return "\n".join(
        [
            f"Model `{args.model.name}`, its {args.gguf} GGUF as the training image writes it "
            f"({entry['bytes'] / 1e6:.0f} MB, exported in {entry['export_s']:.0f} s), llama-cpp-python "
            f"{llama_cpp.__version__}; {args.new_tokens} new tokens per request, greedy, raw-text prompts; "
            f"{os.cpu_count()} cores, load average {load_before[0]:.1f} when the run started. Same run as the "
            "table above.",
            "",
            "| metric | ours, SERVE_ENGINE=llamacpp | anchor | ratio | target |",
            "|---|---|---|---|---|",
            f"| output tokens/s, 1 client, requests one after another, over HTTP vs llama.cpp's own `Llama` "
            f"in-process on the same GGUF | {cell(single)} | {cell(anchor)} | **{single_ratio:.2f}x** | "
            f">= 0.9x: {verdict(single_ratio >= 0.9)} |",
            f"| output tokens/s, {args.clients} concurrent clients, vs the transformers engine's "
            f"{args.clients} clients above | {cell(clients)} | {cell(transformers_clients)} | "
            f"**{clients_ratio:.2f}x** | >= 2.5x: {verdict(clients_ratio >= 2.5)} |",
            f"| time to first token p50, 50-token prompt, no other load | {ttft * 1000:.0f} ms | | | "
            f"<= 150 ms: {verdict(ttft <= 0.15)} |",
            f"| reference: the transformers engine, 1 client | {cell(transformers_single)} | | | |",
            f"| /ping p99 while {args.clients} generations run ({clients['pings']} pings) | "
            f"{clients['ping_p99_ms']:.1f} ms | | | |",
            f"| `serve` start to first 200 from /ping | {startup_s:.1f} s | | | |",
            f"| peak resident memory (worker + master) | {rss['worker'] + rss['master']:.0f} MiB | | | |",
        ]
    )


def measure_baseline(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokens, elapsed = 0, 0.0
    with torch.inference_mode():
        model.generate(**tokenizer("warm up", return_tensors="pt"), max_new_tokens=4, do_sample=False)
        for prompt in PROMPTS[: args.baseline_requests]:
            inputs = tokenizer(prompt, return_tensors="pt")
            started = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            elapsed += time.perf_counter() - started
            tokens += out.shape[1] - inputs.input_ids.shape[1]
        # Reference ceiling, not the anchor: the clients' prompts as one static left-padded batch.
        tokenizer.padding_side = "left"
        batch = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(args.clients)], return_tensors="pt", padding=True)
        started = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False)
        static_s = time.perf_counter() - started
        generated = out[:, batch.input_ids.shape[1] :]
        eos = set(
            model.generation_config.eos_token_id
            if isinstance(model.generation_config.eos_token_id, list)
            else [model.generation_config.eos_token_id]
        )
        static_tokens = sum(_until_eos(row.tolist(), eos) for row in generated)
    prompt_50 = tokenizer.decode(tokenizer(" ".join(PROMPTS) * 3).input_ids[:50])
    args.prompt_50 = prompt_50
    with torch.inference_mode():  # TTFT reference: the bare model's prefill + first token for that prompt
        inputs = tokenizer(prompt_50, return_tensors="pt")
        samples = []
        for _ in range(args.ttft_samples):
            started = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            samples.append(time.perf_counter() - started)
    args.model_ttft = statistics.median(samples)
    del model
    return (
        {"tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed},
        {"tokens_per_s": static_tokens / static_s, "tokens": static_tokens, "seconds": static_s},
    )


def _until_eos(ids: list[int], eos: set[int]) -> int:
    for n, token in enumerate(ids, start=1):
        if token in eos:
            return n
    return len(ids)


def measure_ttft(server: Server, args) -> float:
    samples = []
    for _ in range(args.ttft_samples):
        samples.append(server.time_to_first_token(args.prompt_50))
    return statistics.median(samples)


def ping_p99(server: Server, count: int) -> float:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        server.request("GET", "/ping")
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)
    latencies.sort()
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


def measure_concurrent(server: Server, args) -> dict:
    pings: list[float] = []
    done = threading.Event()

    def ping_loop():
        while not done.is_set():
            started = time.perf_counter()
            status = server.request("GET", "/ping")[0]
            pings.append((time.perf_counter() - started) * 1000)
            assert status == 200
            time.sleep(0.05)

    pinger = threading.Thread(target=ping_loop, daemon=True)

    def client(i: int) -> list[dict]:  # a closed loop: the next request as soon as the last is answered
        prompts = [PROMPTS[(i + k * args.clients) % len(PROMPTS)] for k in range(args.requests_per_client)]
        return [server.generate(p, args.new_tokens) for p in prompts]

    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        pinger.start()
        started = time.perf_counter()
        results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
        elapsed = time.perf_counter() - started
    done.set()
    pinger.join()
    tokens = sum(r["details"]["generated_tokens"] for r in results)
    pings.sort()
    return {
        "tokens_per_s": tokens / elapsed,
        "tokens": tokens,
        "seconds": elapsed,
        "ping_p99_ms": pings[min(len(pings) - 1, int(len(pings) * 0.99))],
        "pings": len(pings),
    }


class Server:
    """containers/serve/serve on a free loopback port, serving `model_dir` as $SAGEMAKER_BASE_DIR/model."""

    def __init__(self, model_dir: Path, engine: str = "auto"):
        self.model_dir = model_dir.resolve()
        self.engine = engine

    def __enter__(self) -> Server:
        self._tmp = tempfile.TemporaryDirectory()
        base = Path(self._tmp.name)
        (base / "model").symlink_to(self.model_dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # `serve` chooses its OpenMP wait policy per engine: this process's PASSIVE (for the anchor) stays here.
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "SAGEMAKER_")) and k != "OMP_WAIT_POLICY"
        }
        env.update(SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_BIND_TO_PORT=str(self.port), SERVE_HOST="127.0.0.1")
        env["SERVE_ENGINE"] = self.engine
        self._log = open(base / "server.log", "wb")  # closed in __exit__
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(SERVE)], env=env, stdout=self._log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError((base / "server.log").read_text())
            try:
                if self.request("GET", "/ping")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=40)
        self._log.close()
        self._tmp.cleanup()

    def request(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def generate(self, prompt: str, new_tokens: int) -> dict:
        status, raw = self.request(
            "POST",
            "/invocations",
            {
                "inputs": prompt,
                "parameters": {"max_new_tokens": new_tokens, "apply_chat_template": False, "details": True},
            },
        )
        assert status == 200, raw
        return json.loads(raw)[0]

    def time_to_first_token(self, prompt: str) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            body = json.dumps(
                {
                    "inputs": prompt,
                    "stream": True,
                    "parameters": {"max_new_tokens": 8, "apply_chat_template": False},
                }
            )
            started = time.perf_counter()
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.readline()  # the first `data:` frame
            ttft = time.perf_counter() - started
            response.read()
            return ttft
        finally:
            conn.close()

    def peak_rss_mib(self) -> dict:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return {
            "worker": sum(_vm_hwm_mib(int(pid)) for pid in children),
            "master": _vm_hwm_mib(self.proc.pid),
        }


def _vm_hwm_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def render(args, baseline, static, ours, ttft, startup_s, rss, ratio, load_before) -> str:
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    total_rss = rss["worker"] + rss["master"]
    return "\n".join(
        [
            f"Model `{args.model.name}` (fp32, CPU), {args.new_tokens} new tokens per request, greedy, "
            "raw-text prompts; "
            f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"load average {load_before[0]:.1f} when the run started. Command: "
            f"`python benchmarks/serve_throughput.py --model {args.model}`.",
            "",
            "| metric | ours | anchor | ratio | target |",
            "|---|---|---|---|---|",
            f"| output tokens/s, {args.clients} concurrent clients over HTTP vs one `model.generate` "
            f"at a time in-process | {ours['tokens_per_s']:.1f} "
            f"({ours['tokens']} tokens in {ours['seconds']:.1f} s) | "
            f"{baseline['tokens_per_s']:.1f} ({baseline['tokens']} tokens in {baseline['seconds']:.1f} s) | "
            f"**{ratio:.2f}x** | >= 4x: {verdict(ratio >= 4)} |",
            f"| reference: HF's own static batching, the same prompts as one `generate` batch of {args.clients} "
            f"| {static['tokens_per_s']:.1f} ({static['tokens']} tokens in {static['seconds']:.1f} s) | "
            f"{baseline['tokens_per_s']:.1f} | {static['tokens_per_s'] / baseline['tokens_per_s']:.2f}x | |",
            f"| time to first token p50, 50-token prompt, no other load (anchor: the bare model's prefill and "
            f"first token, in-process) | {ttft * 1000:.0f} ms | {args.model_ttft * 1000:.0f} ms | "
            f"{ttft / args.model_ttft:.2f}x | "
            f"<= 300 ms: {verdict(ttft <= 0.3)} |",
            f"| /ping p99 while {args.clients} generations run ({ours['pings']} pings) | "
            f"{ours['ping_p99_ms']:.1f} ms | | | <= 10 ms: {verdict(ours['ping_p99_ms'] <= 10)} |",
            f"| reference: /ping p99 with nothing running (200 pings) | {args.idle_ping_p99_ms:.1f} ms | | | |",
            f"| `serve` start to first 200 from /ping | {startup_s:.1f} s | | | <= 20 s: {verdict(startup_s <= 20)} |",
            f"| peak resident memory under that load (worker + master) | {total_rss:.0f} MiB "
            f"({rss['worker']:.0f} + {rss['master']:.0f}) | | | <= 2048 MiB: {verdict(total_rss <= 2048)} |",
            "",
            f"Each of the {args.clients} clients sent {args.requests_per_client} requests back to back. "
            "Absolute figures drift with the machine's load (see the load average); the ratios compare "
            "figures measured in the same run. The static-batch row is plain Transformers batching with stock "
            "kernels: ours can beat it because batched steps multiply through oneDNN with packed weights "
            "(`SERVE_CPU_MATMUL`, docs/serving.md), where PyTorch's stock MKL kernel is slow for the few-row "
            "products of a decode step on this machine's AMD CPU.",
        ]
    )


if __name__ == "__main__":
    main()
