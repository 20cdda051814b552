"""The whole stack as local processes, without Docker: the same services, ports and environment as compose.yaml.

    python -m stack_runner up                 # train on the sample data, serve it, open http://127.0.0.1:8000,
                                              # then evaluate base vs tuned while the page is up
    python -m stack_runner up --ab            # a second endpoint variant serving the base model (80/20 split)
    python -m stack_runner up --model-dir D   # skip training: serve an existing artifact directory
    python -m stack_runner up --check         # start, ask one question through API Gateway, stop (exit 0 = works)

The path is the one AWS runs: web page (static site standing in for CloudFront, :8000) -> API Gateway
emulator (:3000) -> Lambda runtime emulator running lambda/ unmodified (:3001) -> SageMaker runtime
endpoint emulator (:8081) -> serving container(s) (:8080, base variant :8082). Data and the model artifact
go through the S3 stand-in (:8333) as model.tar.gz, like a SageMaker training job's output.

The page comes first: the training job runs with `evaluation=deferred`, and the training image's `evaluate`
command compares base and tuned model in the background once the page answers; its report is printed when
it is done and written where `make train-demo` writes it (runs/demo-<timestamp>/output/data/).
Logs: .local/logs/<service>.log. Ctrl-C stops everything, training and evaluation included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCAL_DIR = REPO / ".local"
RUNS_DIR = REPO / "runs"
TRAIN_IMAGE = REPO / "containers" / "train"
SAMPLE_DATA = REPO / "data" / "sample" / "toolkit_faq.jsonl"
ENDPOINT_NAME = "faq-assistant"
BUCKET = "sagemaker-local"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@dataclass(frozen=True)
class Ports:
    web: int = 8000
    apigw: int = 3000
    lambda_runtime: int = 3001
    runtime_emulator: int = 8081
    serve: int = 8080
    serve_base: int = 8082
    s3: int = 8333


@dataclass
class Stack:
    """Started processes, stopped in reverse order. Logs and generated config live under `workdir`."""

    workdir: Path
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def start(self, name: str, command: list[str], env: dict[str, str], to_terminal: bool = False) -> subprocess.Popen:
        """Each process in its own session: Ctrl-C reaches only this runner, which stops them in order.
        `to_terminal` shows the output (a training job's progress) instead of writing a log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = None if to_terminal else (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if log is not None:
            log.close()  # the child has its own copy
        self.processes.append((name, process))
        where = "output below" if to_terminal else f"log {self.logs / (name + '.log')}"
        print(f"  started {name} (pid {process.pid}), {where}", flush=True)
        return process

    def wait_exit(self, name: str) -> int:
        """Wait for a job-like process to finish; it leaves the list of processes to stop."""
        process = dict(self.processes)[name]
        while process.poll() is None:
            time.sleep(0.2)  # a short sleep, not wait(): Ctrl-C must interrupt this at once
        self.forget(name)
        return process.returncode

    def forget(self, name: str) -> None:
        self.processes = [(n, p) for n, p in self.processes if n != name]

    def wait_healthy(self, name: str, url: str, timeout: float) -> None:
        process = dict(self.processes)[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}:\n{self.tail(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        print(f"  {name} is healthy ({url})", flush=True)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{name} not healthy at {url} after {timeout:.0f} s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, grace: float = 30.0) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, process in reversed(self.processes):
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                print(f"  {name} did not stop in time; killing it", flush=True)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()


def python_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **FAKE_AWS, "PYTHONUNBUFFERED": "1", **extra}


def run(command: list[str], env: dict[str, str], what: str) -> None:
    print(f"  {what}: {' '.join(command)}", flush=True)
    code = subprocess.call(command, cwd=REPO, env=env)
    if code != 0:
        raise RuntimeError(f"{what} failed with exit code {code}")


def train_through_s3(stack: Stack, ports: Ports, data: Path, hyperparameters: list[str], job: Path) -> Path:
    """A training job as SageMaker runs it: dataset from S3, train, model.tar.gz back to S3."""
    s3_env = python_env(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{ports.s3}")
    dataset_uri = f"s3://{BUCKET}/datasets/{data.name}"
    model_uri = f"s3://{BUCKET}/models/{ENDPOINT_NAME}/model.tar.gz"
    s3 = [sys.executable, "-m", "s3_standin"]
    run([*s3, "seed", "--bucket", BUCKET, "--dataset", str(data)], s3_env, "upload the dataset to S3")
    run(
        [*s3, "download", dataset_uri, str(job / "input" / "data" / "train" / data.name)],
        s3_env,
        "download the train channel",
    )
    (job / "input" / "config").mkdir(parents=True, exist_ok=True)
    (job / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps(dict(item.split("=", 1) for item in hyperparameters))
    )
    print(f"  job tree {job}", flush=True)
    stack.start("train", [sys.executable, str(TRAIN_IMAGE / "train")], job_env(job), to_terminal=True)
    code = stack.wait_exit("train")
    if code != 0:
        failure = job / "output" / "failure"
        reason = failure.read_text().splitlines()[0] if failure.exists() else "see the log above"
        raise RuntimeError(f"the training job failed (exit {code}): {reason}")
    run([*s3, "upload-model", str(job / "model"), model_uri], s3_env, "upload model.tar.gz")
    endpoint_dir = stack.workdir / "endpoints" / "tuned"
    shutil.rmtree(endpoint_dir, ignore_errors=True)
    run([*s3, "fetch-model", model_uri, str(endpoint_dir / "model")], s3_env, "fetch the artifact for the endpoint")
    return endpoint_dir / "model"


def job_env(job: Path) -> dict[str, str]:
    return {**os.environ, "SAGEMAKER_BASE_DIR": str(job), "PYTHONUNBUFFERED": "1"}


def with_deferred_evaluation(hyperparameters: list[str]) -> list[str]:
    """The page first: the job skips its own A/B evaluation unless the user set `evaluation` themselves."""
    if any(item.split("=", 1)[0] == "evaluation" for item in hyperparameters):
        return hyperparameters
    return [*hyperparameters, "evaluation=deferred"]


def endpoint_config(ports: Ports, ab: bool) -> dict:
    variants = [{"name": "tuned", "url": f"http://127.0.0.1:{ports.serve}", "weight": 0.8 if ab else 1.0}]
    if ab:
        variants.append({"name": "base", "url": f"http://127.0.0.1:{ports.serve_base}", "weight": 0.2})
    return {"invocation_timeout_s": 60, "endpoints": {ENDPOINT_NAME: {"variants": variants}}}


def start_serving(stack: Stack, name: str, model_dir: Path, port: int) -> None:
    base = model_dir.parent
    if model_dir.name != "model":  # the server reads $SAGEMAKER_BASE_DIR/model
        base = stack.workdir / "endpoints" / name
        base.mkdir(parents=True, exist_ok=True)
        link = base / "model"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(model_dir.resolve(), target_is_directory=True)
    stack.start(
        name,
        [sys.executable, str(REPO / "containers" / "serve" / "serve")],
        {
            **os.environ,
            "SAGEMAKER_BASE_DIR": str(base),
            "SAGEMAKER_BIND_TO_PORT": str(port),
            "SERVE_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        },
    )


def start_gateway_path(
    stack: Stack,
    ports: Ports,
    endpoints: dict,
    *,
    lambda_concurrency: int = 8,
    allow_origin: str | None = None,
    apigw_args: tuple[str, ...] = (),
    prewarm: bool = True,
) -> None:
    """Endpoint emulator (with `endpoints` as its config) -> the Lambda, lambda/ unmodified -> API Gateway,
    started and waited for. `allow_origin`: the page's origin, for CORS and the gateway's own error responses."""
    config_path = stack.workdir / "endpoints.json"
    config_path.write_text(json.dumps(endpoints, indent=2))
    stack.start(
        "runtime-emulator",
        [sys.executable, "-m", "runtime_emulator", "--config", str(config_path), "--port", str(ports.runtime_emulator)],
        python_env(),
    )
    lambda_command = [
        sys.executable,
        "-m",
        "lambda_runtime_emulator",
        "--port",
        str(ports.lambda_runtime),
        "--handler",
        "qa_function.handler.handler",
        "--task-root",
        "lambda/src",
        "--timeout",
        "29",
        "--max-concurrency",
        str(lambda_concurrency),
        *(["--prewarm"] if prewarm else []),
    ]
    origin = {"CORS_ALLOW_ORIGINS": allow_origin} if allow_origin else {}
    runtime_url = f"http://127.0.0.1:{ports.runtime_emulator}"
    stack.start(
        "lambda",
        lambda_command,
        python_env(ENDPOINT_NAME=ENDPOINT_NAME, AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=runtime_url, **origin),
    )
    apigw = [sys.executable, "-m", "apigw_emulator", "--port", str(ports.apigw)]
    apigw += ["--lambda-endpoint-url", f"http://127.0.0.1:{ports.lambda_runtime}", *apigw_args]
    if allow_origin:
        apigw += ["--gateway-responses-allow-origin", allow_origin]
    stack.start("apigw", apigw, python_env())
    stack.wait_healthy("runtime-emulator", f"{runtime_url}/ping", 30)
    stack.wait_healthy("lambda", f"http://127.0.0.1:{ports.lambda_runtime}/_emulator/health", 60)
    stack.wait_healthy("apigw", f"http://127.0.0.1:{ports.apigw}/_emulator/health", 30)


def start_front(stack: Stack, ports: Ports, ab: bool, api_key: str | None) -> None:
    """The gateway path, then the page (static site standing in for CloudFront)."""
    start_gateway_path(
        stack,
        ports,
        endpoint_config(ports, ab),
        allow_origin=f"http://127.0.0.1:{ports.web}",
        apigw_args=("--api-keys", api_key) if api_key else (),
    )
    stack.start(
        "web",
        [
            sys.executable,
            "-m",
            "static_site",
            "--port",
            str(ports.web),
            "--root",
            "web",
            "--api-base-url",
            f"http://127.0.0.1:{ports.apigw}/prod",
        ],
        python_env(),
    )
    stack.wait_healthy("web", f"http://127.0.0.1:{ports.web}/index.html", 30)


def ask(ports: Ports, question: str, api_key: str | None = None, timeout: float = 60) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports.apigw}/prod/ask",
        data=json.dumps({"question": question}).encode(),
        headers={"Content-Type": "application/json", **({"x-api-key": api_key} if api_key else {})},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def up(args) -> int:
    ports = Ports()
    stack = Stack(LOCAL_DIR)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` / compose-style stop: the same clean shutdown as Ctrl-C
    # Set outright: a shell starts background jobs with SIGINT ignored, and Ctrl-C must stop the stack anyway.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        model_dir, job, evaluate_later = args.model_dir, None, False
        if model_dir is None:
            print("S3 stand-in", flush=True)
            stack.start(
                "s3",
                [
                    sys.executable,
                    "-m",
                    "s3_standin",
                    "serve",
                    "--data-dir",
                    str(stack.workdir / "s3"),
                    "--port",
                    str(ports.s3),
                ],
                python_env(),
            )
            run(
                [
                    sys.executable,
                    "-m",
                    "s3_standin",
                    "wait",
                    "--timeout",
                    "90",
                    "--data-dir",
                    str(stack.workdir / "s3"),
                ],
                python_env(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{ports.s3}"),
                "wait for S3",
            )
            print("Training job (the embedded default model on the sample data)", flush=True)
            job = RUNS_DIR / time.strftime("demo-%Y%m%d-%H%M%S")
            hyperparameters = with_deferred_evaluation(args.hp)
            evaluate_later = "evaluation=deferred" in hyperparameters
            model_dir = train_through_s3(stack, ports, args.data, hyperparameters, job)
        print("Endpoint", flush=True)
        start_serving(stack, "serve", model_dir, ports.serve)
        if args.ab:
            base = args.base_model_dir or _base_variant(model_dir, stack.workdir / "base-model")
            start_serving(stack, "serve-base", base, ports.serve_base)
        stack.wait_healthy("serve", f"http://127.0.0.1:{ports.serve}/ping", 180)
        if args.ab:
            stack.wait_healthy("serve-base", f"http://127.0.0.1:{ports.serve_base}/ping", 180)
        print("Front: endpoint emulator, Lambda, API Gateway, web page", flush=True)
        start_front(stack, ports, args.ab, args.api_key)
        answer = ask(ports, "What does this toolkit do?", args.api_key)
        print(f"\nSmoke question answered by variant {answer.get('variant')}: {answer.get('answer', '')[:120]!r}")
        if args.check:
            return 0
        print(f"\nThe stack is up. Open http://127.0.0.1:{ports.web}  (Ctrl-C stops it)", flush=True)
        if evaluate_later:
            stack.start("evaluate", [sys.executable, str(TRAIN_IMAGE / "evaluate")], job_env(job))
            print(
                "Evaluating the base and the tuned model in the background; the report follows when it is done.",
                flush=True,
            )
        return watch(stack, job)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        print("stopping the stack ...", flush=True)
        stack.stop()


def watch(stack: Stack, job: Path | None) -> int:
    """Serve until a service dies; print the evaluation's report when it finishes."""
    while True:
        time.sleep(1)
        for name, process in list(stack.processes):
            if process.poll() is None:
                continue
            if name != "evaluate":
                print(f"{name} stopped unexpectedly:\n{stack.tail(name)}", file=sys.stderr)
                return 1
            stack.forget(name)
            report_path = job / "output" / "data" / "eval_report.json"
            if process.returncode == 0 and report_path.exists():
                print("\n" + before_after_text(json.loads(report_path.read_text())), flush=True)
                print(f"Reports, sample answers, loss curve: {report_path.parent}", flush=True)
            else:
                print(
                    f"\nThe evaluation failed (exit {process.returncode}); the page keeps serving:\n{stack.tail(name)}",
                    file=sys.stderr,
                    flush=True,
                )


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def before_after_text(eval_report: dict) -> str:
    from trainer.report import before_after_text as text  # the training image's own wording (no torch)

    return text(eval_report)


def _base_variant(tuned: Path, target: Path) -> Path:
    """The A/B base variant as on AWS: the tuned artifact's own base model, untuned, packaged with the prompt format
    and dtype the tuned model got (the training image's package-base), so both variants answer the same prompt."""
    from trainer.base_variant import package_base, parse_args
    from trainer.modeling import default_cache_dir

    print(f"Base variant: the tuned model's base, untuned, in {target}", flush=True)
    return package_base(parse_args(["--tuned-artifact", str(tuned), "--output", str(target)]), default_cache_dir())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stack_runner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start the stack (training first, unless --model-dir)")
    start.add_argument("--data", type=Path, default=SAMPLE_DATA, help="training data file (default: the sample)")
    start.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="training hyperparameter")
    start.add_argument("--model-dir", type=Path, help="serve this artifact directory instead of training one")
    start.add_argument("--ab", action="store_true", help="add a 'base' variant serving the base model (20%%)")
    start.add_argument(
        "--base-model-dir",
        type=Path,
        help="the base variant's model (default: the tuned model's base, packaged untuned)",
    )
    start.add_argument("--api-key", help="require this x-api-key on the API Gateway emulator")
    start.add_argument("--check", action="store_true", help="ask one question, then stop (exit 0 = it works)")
    args = parser.parse_args(argv)
    for item in args.hp:
        if "=" not in item:
            parser.error(f"--hp expects KEY=VALUE, got {item!r}")
    if args.model_dir is None and not args.data.exists():
        parser.error(f"--data {args.data} does not exist")
    return up(args)


if __name__ == "__main__":
    sys.exit(main())
