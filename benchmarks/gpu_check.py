"""GPU check, for when a GPU is lent: the reference project's own model, dolly-v2-3b's shape, trained and served
on one GPU with our own images' code, each figure beside the hardware's own limit.

    python benchmarks/gpu_check.py --tokenizer DIR --faq CSV --out DIR [--size dolly-3b|tiny] [--budget-s S] [--write]

`--tokenizer`: SmolLM2's tokenizer directory (the embedded model's), made Dolly-like here: no chat template,
`### Instruction:` / `### Response:` / `### End` as added special tokens, `<|padding|>` in the vocabulary.
`--faq`: the Amazon SageMaker FAQ CSV (scripts/fetch_faq_dataset.py downloads it).

No model hub is reachable from the GPU machine, so the weights are random, built from dolly-v2-3b's config
(GPT-NeoX, 32 layers, d=2560, parallel residual, 25% rotary, untied head, 50,280-token vocabulary) in bf16.
Throughput does not depend on the weights' values; answer quality is not measured here.

Parts, in order, each on its own (one that fails is recorded and the others run; GPU time is scarce):
- bandwidth: device-to-device copy, the memory-bandwidth bound that decoding is compared with;
- decode_probe: the bare Transformers model's decode step (eager, no server), batch 1 and 32: what the engine
  adds on top of the model's own forward;
- serve: `containers/serve/serve` (gunicorn + our batching engine) in bf16, 1 and 32 concurrent clients,
  128 new tokens each, against the bandwidth bound;
- lora, full: `containers/train/train` (the training image's entry point), bf16 mixed precision, packed rows of
  2,048 tokens, no DeepSpeed (one GPU); tokens/s from its own log lines, then MFU against the GPU's dense bf16 peak;
- full_zero3_offload: full fine-tuning under `deepspeed=zero3_offload`, a few steps: its peak GPU memory.
`--budget-s` skips what would not finish inside the budget. Writes results.json (after every part) and section.md
to --out; with --write, the `gpu` section of docs/benchmarks.md. `--size tiny` runs every step on a CPU in a minute,
to check this script before spending GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import write_section

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "containers" / "train" / "train"
DOLLY_SPECIAL_TOKENS = ["### End", "### Instruction:", "### Response:"]

SHAPES = {
    # databricks/dolly-v2-3b's config.json (a fine-tuned pythia-2.8b).
    "dolly-3b": dict(
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=10240,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        vocab_size=50280,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        vocab_size=50280,
    ),
}
# Dense bf16 peak (no sparsity) by device name, from NVIDIA's data sheets (SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# Rough seconds each part needs on an H200 with dolly-3b, to skip what the budget cannot fit.
PART_SECONDS = {"serve": 60, "lora": 60, "full": 80, "full_zero3_offload": 130}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="SmolLM2's tokenizer directory")
    parser.add_argument("--faq", type=Path, required=True, metavar="PATH", help="the Amazon SageMaker FAQ CSV")
    parser.add_argument("--out", type=Path, required=True, help="where results.json, section.md and logs go")
    parser.add_argument("--work", type=Path, default=None, help="scratch space for models and jobs (default: OUT/work)")
    parser.add_argument("--size", choices=sorted(SHAPES), default="dolly-3b")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per throughput run")
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=16,
        help="packed rows of --seq-len tokens per step (the FAQ packs into ~9 rows of 2,048: one step an epoch)",
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--offload-steps", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--budget-s", type=float, default=0, help="skip parts that would not finish in time (0: none)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: " + ", ".join(PART_SECONDS))
    parser.add_argument("--write", action="store_true", help="also rewrite the gpu section of docs/benchmarks.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    skip = set(filter(None, args.skip.split(",")))
    model_dir, params = build_model(args.size, args.tokenizer, work / "dolly-v2-3b-shaped")
    results = {"device": device_name(), "size": args.size, "parameters": params, "training": {}, "serving": {}}
    print(f"device: {results['device']}; model: {params['total'] / 1e9:.3f} B parameters", flush=True)
    results["bandwidth"] = attempt(copy_bandwidth)
    results["packed_attention"] = attempt(packed_attention_check)
    print(f"packed attention: {json.dumps(results['packed_attention'])}", flush=True)
    results["decode_probe"] = attempt(decode_probe, model_dir)
    save(args.out, results)

    def time_left(part: str) -> float | None:
        """Seconds this part may take; None when the budget cannot fit it."""
        if not args.budget_s:
            return 3600.0
        left = args.budget_s - (time.monotonic() - started)
        return left if left >= PART_SECONDS[part] * (1 if gpu() else 0) else None

    runs = {
        "serve": lambda limit: serve(model_dir, args, results["bandwidth"], params, limit),
        "lora": lambda limit: train("lora", "none", model_dir, args, work, params, limit),
        "full": lambda limit: train("full", "none", model_dir, args, work, params, limit),
        "full_zero3_offload": lambda limit: train("full", "zero3_offload", model_dir, args, work, params, limit),
    }
    for part, run in runs.items():
        if part in skip:
            continue
        limit = time_left(part)
        outcome = {"error": "skipped: not enough of --budget-s left"} if limit is None else attempt(run, limit)
        if part == "serve":
            results["serving"] = outcome
        else:
            results["training"][part] = outcome
        print(f"{part}: {json.dumps(outcome)}", flush=True)
        save(args.out, results)
    section = render(results, args)
    (args.out / "section.md").write_text(section + "\n")
    print(section)
    if args.write:
        write_section("gpu", section)
    shutil.rmtree(work, ignore_errors=True)


def attempt(part, *args) -> dict:
    try:
        return part(*args)
    except Exception as e:  # recorded in the results, and the run goes on
        print(f"{getattr(part, '__name__', 'part')} failed: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"[-2000:]}


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def dolly_tokenizer(tokenizer_dir: Path):
    """SmolLM2's byte-level BPE made to look like Dolly's tokenizer (GPT-NeoX's is byte-level BPE too)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = None
    tokenizer.pad_token = None  # Dolly's sets none; the trainer picks `<|padding|>`
    tokenizer.add_special_tokens(
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "additional_special_tokens": DOLLY_SPECIAL_TOKENS}
    )
    tokenizer.add_tokens(["<|padding|>"], special_tokens=True)
    return tokenizer


def build_model(size: str, tokenizer_dir: Path, target: Path) -> tuple[Path, dict]:
    """A GPT-NeoX model of dolly-v2-3b's shape with random weights, saved in bf16 with a Dolly-like tokenizer."""
    import torch
    from transformers import GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = dolly_tokenizer(tokenizer_dir)
    shape = dict(SHAPES[size])
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = GPTNeoXConfig(
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = GPTNeoXForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, do_sample=False)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    params = {
        "total": total,
        "non_embedding": total - embedding,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        # What one decode step reads: every weight but the input embedding (a lookup reads only its rows).
        "decode_weight_bytes": (total - embedding) * 2,
        # Keys and values of one token, all layers, bf16.
        "kv_bytes_per_token": 2 * config.num_hidden_layers * config.hidden_size * 2,
    }
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return target, params


def copy_bandwidth() -> dict:
    """Device memory bandwidth as a device-to-device copy moves it (bytes read plus bytes written)."""
    import torch

    if not torch.cuda.is_available():
        return {"bytes_per_s": None}
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    del source, target
    torch.cuda.empty_cache()
    return {"bytes_per_s": 2 * 2**30 / seconds}


def packed_attention_check() -> dict:
    """The training image's packed attention (PyTorch's varlen Flash kernel on a GPU) against plain SDPA run on
    each example alone, on dolly-3b's head shape in bf16: the largest difference, and both timings."""
    import torch
    from trainer import packed_attention

    if not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    torch.manual_seed(0)
    lengths = [200, 170, 240, 90, 310, 150, 220, 180, 260, 228]  # ~10 FAQ examples in one 2,048-token row
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 32, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    timings = {}
    outputs = {}
    for name, kernel in (
        ("varlen", packed_attention.varlen_causal),
        ("reference", packed_attention.reference_varlen_causal),
    ):
        outputs[name] = kernel(q, k, v, bounds, max(lengths), None)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            kernel(q, k, v, bounds, max(lengths), None)
        torch.cuda.synchronize()
        timings[f"{name}_ms"] = (time.perf_counter() - started) / 10 * 1000
    difference = (outputs["varlen"].float() - outputs["reference"].float()).abs().max().item()
    return {"max_abs_difference": difference, **timings}


def decode_probe(model_dir: Path) -> dict:
    """Milliseconds per decode step of the bare model (eager, Transformers' DynamicCache) after a 64-token
    prompt, at batch 1 and 32: the floor our engine's per-token time stands on."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    results = {}
    for batch in (1, 32):
        ids = torch.randint(100, 1000, (batch, 64), device=device)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps = 40
            for i in range(steps + 8):
                if i == 8:  # warmed up
                    if device == "cuda":
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            if device == "cuda":
                torch.cuda.synchronize()
        results[f"batch_{batch}_ms"] = (time.perf_counter() - started) / steps * 1000
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def train(method: str, deepspeed: str, model_dir: Path, args, work: Path, params: dict, limit: float) -> dict:
    """One training job through the image's entry point, in a job tree of its own."""
    label = method if deepspeed == "none" else f"{method}_{deepspeed}"
    job_dir = work / f"job-{label}"
    shutil.rmtree(job_dir, ignore_errors=True)
    config = job_dir / "input" / "config"
    config.mkdir(parents=True)
    (job_dir / "input" / "data" / "train").mkdir(parents=True)
    shutil.copy(args.faq, job_dir / "input" / "data" / "train" / "faq.csv")
    offload = deepspeed == "zero3_offload"
    hyperparameters = {
        "model_id": str(model_dir),
        "method": method,
        "deepspeed": deepspeed,
        "precision": "bf16" if gpu() else "fp32",
        "packing": "true",
        "max_seq_length": args.seq_len,
        "max_steps": args.offload_steps if offload else args.steps,
        "per_device_batch_size": 1 if offload else args.batch_rows,
        "logging_steps": 1 if offload else 4,
        "learning_rate": 2e-4 if method == "lora" else 2e-5,
        "save_steps": 100000,  # no checkpoints mid-run: a full one of this model is ~33 GB
        "evaluation": "deferred",  # random weights: answer quality means nothing here
    }
    (config / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hyperparameters.items()}))
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job_dir), "PYTHONUNBUFFERED": "1"}
    log_path = args.out / f"train-{label}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(TRAIN)], env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout"
    wall = time.perf_counter() - started
    log = log_path.read_text(errors="replace")
    interval_rates = [float(r) for r in re.findall(r"tokens_per_second=([\d.]+)", log)]
    memory = re.search(r"peak GPU memory: ([\d.]+) GiB allocated, ([\d.]+) GiB reserved", log)
    shutil.rmtree(job_dir, ignore_errors=True)
    if code != 0 and not (offload and memory):
        raise RuntimeError(f"{label} training ended with {code} after {wall:.0f} s; log {log_path}:\n" + log[-3000:])
    done = re.search(r"training done: (\d+) steps, (\d+) s, ([\d.]+) tokens/s", log)
    steady = statistics.median(interval_rates[1:]) if len(interval_rates) > 1 else float(done.group(3))
    # Model FLOPs per trained token: 6N for full fine-tuning (forward 2N, backward 4N); 4N for LoRA, whose
    # frozen weights get input gradients but no weight gradients. N excludes the embedding lookup.
    flops_per_token = (6 if method == "full" else 4) * params["non_embedding"]
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name()), None)
    return {
        "method": method,
        "deepspeed": deepspeed,
        "steps": int(done.group(1)) if done else None,
        "tokens_per_s_whole_run": float(done.group(3)) if done else None,
        "tokens_per_s_steady": steady,
        "job_wall_s": round(wall, 1),
        "peak_gpu_memory_gib": float(memory.group(1)) if memory else None,
        "peak_gpu_memory_reserved_gib": float(memory.group(2)) if memory else None,
        "mfu": steady * flops_per_token / peak if peak else None,
        "flops_per_token": flops_per_token,
        "batch_rows": hyperparameters["per_device_batch_size"],
        "seq_len": args.seq_len,
        "exit": code,
    }


def serve(model_dir: Path, args, bandwidth: dict, params: dict, limit: float) -> dict:
    from serve_throughput import PROMPTS, Server

    deadline = time.monotonic() + limit
    results = {}
    with Server(model_dir) as server:
        results["startup_s"] = round(server.startup_s, 1)
        server.generate(PROMPTS[0], 8)
        for clients in (int(c) for c in args.concurrency.split(",")):
            if time.monotonic() > deadline:
                break
            per_client = 3 if clients == 1 else 2

            def client(i: int, per_client=per_client, clients=clients) -> list[tuple[dict, float]]:
                out = []
                for k in range(per_client):
                    started = time.perf_counter()
                    reply = server.generate(PROMPTS[(i + k * clients) % len(PROMPTS)], args.new_tokens)
                    out.append((reply, time.perf_counter() - started))
                return out

            with ThreadPoolExecutor(max_workers=clients) as pool:
                started = time.perf_counter()
                replies = [r for rs in pool.map(client, range(clients)) for r in rs]
                elapsed = time.perf_counter() - started
            tokens = sum(reply["details"]["generated_tokens"] for reply, _ in replies)
            latencies = sorted(latency for _, latency in replies)
            results[str(clients)] = {
                "tokens_per_s": tokens / elapsed,
                "bound_tokens_per_s": bandwidth_bound(clients, args.new_tokens, bandwidth, params),
                "requests": len(replies),
                "tokens": tokens,
                "latency_p50_s": statistics.median(latencies),
                "latency_max_s": latencies[-1],
            }
            print(f"serve c={clients}: {json.dumps(results[str(clients)])}", flush=True)
    return results


def bandwidth_bound(clients: int, new_tokens: int, bandwidth: dict, params: dict) -> float | None:
    """Output tokens/s if every decode step only streamed what it must from memory at the measured copy rate:
    the weights once, plus each sequence's keys and values so far (a prompt of ~12 tokens, half the answer on
    average)."""
    if not bandwidth.get("bytes_per_s"):
        return None
    context = 12 + new_tokens / 2
    step_bytes = params["decode_weight_bytes"] + clients * context * params["kv_bytes_per_token"]
    return clients * bandwidth["bytes_per_s"] / step_bytes


def save(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def render(results: dict, args) -> str:
    params = results["parameters"]
    lines = [
        f"Device: {results['device']}, one GPU. Model: GPT-NeoX with databricks/dolly-v2-3b's shape, "
        f"{params['total'] / 1e9:.2f} B parameters ({params['layers']} layers, d={params['hidden']}), random weights "
        "(no model hub on that machine), bf16, Dolly's prompt format. Command: `python benchmarks/gpu_check.py "
        f"--tokenizer DIR --faq Amazon_SageMaker_FAQs.csv --out DIR --write` (size {results['size']}).",
        "",
        "| training (containers/train/train, bf16, FAQ CSV) | tokens/s, steady | tokens/s, whole run | MFU "
        "| peak GPU memory (allocated / reserved) |",
        "|---|---|---|---|---|",
    ]
    for label, r in results["training"].items():
        if "error" in r:
            lines.append(f"| {label} | {r['error'][:200]} | | | |")
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
        memory = (
            f"{r['peak_gpu_memory_gib']:.1f} / {r['peak_gpu_memory_reserved_gib']:.1f} GiB"
            if r["peak_gpu_memory_gib"] is not None
            else "n/a"
        )
        setup = f"DeepSpeed {r['deepspeed']}" if r["deepspeed"] != "none" else "no DeepSpeed"
        whole = f"{r['tokens_per_s_whole_run']:.0f}" if r["tokens_per_s_whole_run"] else "n/a"
        lines.append(
            f"| {r['method']}, {setup}, {r['batch_rows']} packed row(s) of {r['seq_len']} tokens, {r['steps']} steps "
            f"| {r['tokens_per_s_steady']:.0f} | {whole} | {mfu} | {memory} |"
        )
    s = results["serving"]
    bandwidth = results.get("bandwidth", {}).get("bytes_per_s")
    if s.get("error"):
        lines += ["", f"Serving: {s['error'][:300]}"]
    elif s:
        lines += [
            "",
            f"| serving (containers/serve/serve, bf16), {args.new_tokens} new tokens per request "
            "| output tokens/s | memory-bandwidth bound | share of the bound | latency p50 | requests |",
            "|---|---|---|---|---|---|",
        ]
        for key, r in s.items():
            if key.isdigit():
                bound = r.get("bound_tokens_per_s")
                share = f"{r['tokens_per_s'] / bound * 100:.0f}%" if bound else "n/a"
                lines.append(
                    f"| {key} concurrent client(s) | {r['tokens_per_s']:.0f} | {bound:.0f} | {share} "
                    f"| {r['latency_p50_s']:.2f} s | {r['requests']} |"
                    if bound
                    else f"| {key} concurrent client(s) | {r['tokens_per_s']:.0f} | n/a | n/a "
                    f"| {r['latency_p50_s']:.2f} s | {r['requests']} |"
                )
        lines.append(f"| `serve` start to first 200 from /ping | {s['startup_s']} s | | | | |")
    check = results.get("packed_attention", {})
    if check and "max_abs_difference" in check:
        lines += [
            "",
            "Packed attention (PyTorch's varlen Flash kernel, what packed training rows use on a GPU) against plain "
            "SDPA on each example alone, one row of 10 examples, bf16: largest difference "
            f"{check['max_abs_difference']:.4f}, {check['varlen_ms']:.2f} ms against {check['reference_ms']:.2f} ms.",
        ]
    probe = results.get("decode_probe", {})
    if probe and "error" not in probe:
        lines += [
            "",
            f"The bare model's decode step (Transformers, eager, no server): {probe['batch_1_ms']:.1f} ms at batch 1, "
            f"{probe['batch_32_ms']:.1f} ms at batch 32.",
        ]
    lines += [
        "",
        "Tokens/s in training counts non-padding input tokens; 'steady' is the median of the per-log-interval "
        "rates after the first (start-up excluded). MFU = tokens/s x model FLOPs per token / the GPU's dense bf16 "
        "peak (989 TFLOP/s for the H100 and H200 SXM); model FLOPs per token are 6N for full fine-tuning and 4N for "
        "LoRA (frozen weights get no weight gradient), N the non-embedding parameters; attention's sequence-length "
        "term is left out. The memory-bandwidth bound streams the weights once per decode step plus each sequence's "
        "keys and values, at the device-to-device copy rate measured in the same run"
        + (f" ({bandwidth / 1e12:.2f} TB/s)." if bandwidth else "."),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
