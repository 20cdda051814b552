"""Run a Python Lambda function locally under the real runtime interface client (awslambdaric).

    .venv/bin/python -m lambda_runtime_emulator --port 3001 \\
        --handler qa_function.handler.handler --task-root lambda/src --timeout 29

Every flag has an environment variable (the AWS Lambda RIE's names where it has one), for compose:
    LAMBDA_EMULATOR_HOST / LAMBDA_EMULATOR_PORT, LAMBDA_HANDLER, LAMBDA_TASK_ROOT,
    AWS_LAMBDA_FUNCTION_NAME, AWS_LAMBDA_FUNCTION_TIMEOUT, AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    LAMBDA_MAX_CONCURRENCY, LAMBDA_PREWARM=1.
The function inherits this process's environment (ENDPOINT_NAME, CORS_ALLOW_ORIGINS, AWS_* credentials and
AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME, ...), as `sam local` does with the shell's.

Invoke it like Lambda:  curl -XPOST localhost:3001/2015-03-31/functions/function/invocations -d @event.json
or with boto3/the AWS CLI and AWS_ENDPOINT_URL_LAMBDA=http://127.0.0.1:3001.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from werkzeug.serving import make_server

from lambda_runtime_emulator.environment import FunctionSpec
from lambda_runtime_emulator.service import EnvironmentPool, create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m lambda_runtime_emulator", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=env.get("LAMBDA_EMULATOR_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env.get("LAMBDA_EMULATOR_PORT", "3001")))
    parser.add_argument("--handler", default=env.get("LAMBDA_HANDLER", "qa_function.handler.handler"))
    parser.add_argument("--task-root", type=Path, default=Path(env.get("LAMBDA_TASK_ROOT", "lambda/src")))
    parser.add_argument("--function-name", default=env.get("AWS_LAMBDA_FUNCTION_NAME", "qa-function"))
    parser.add_argument(
        "--timeout", type=float, default=float(env.get("AWS_LAMBDA_FUNCTION_TIMEOUT", "29")), help="seconds"
    )
    parser.add_argument("--memory", type=int, default=int(env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")))
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=int(env.get("LAMBDA_MAX_CONCURRENCY", "2")),
        help="execution environments at most; more concurrent invokes get 429 TooManyRequestsException",
    )
    parser.add_argument(
        "--prewarm",
        action=argparse.BooleanOptionalAction,
        default=env.get("LAMBDA_PREWARM", "0") == "1",
        help="start one environment now, so the first request is warm and init errors show at start-up",
    )
    args = parser.parse_args(argv)
    module = args.task_root / args.handler.rsplit(".", 1)[0].replace(".", "/")
    if not (module.with_suffix(".py").exists() or (module / "__init__.py").exists()):
        # Caught here rather than as an init error on the first request: a typo shows at start-up.
        parser.error(f"handler module for {args.handler!r} not found under --task-root {args.task_root}")
    if args.timeout <= 0 or args.max_concurrency < 1:
        parser.error("--timeout must be positive and --max-concurrency at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The runtimes' long-polling /next requests would flood the output with access-log lines.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    spec = FunctionSpec(
        handler=args.handler,
        task_root=args.task_root.resolve(),
        function_name=args.function_name,
        timeout_s=args.timeout,
        memory_mb=args.memory,
        region=os.environ.get("AWS_REGION", "us-east-1"),
    )
    pool = EnvironmentPool(spec, max_concurrency=args.max_concurrency)
    server = make_server(args.host, args.port, create_app(pool, log=_log), threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if args.prewarm:
            pool.prewarm()
        _log(
            f"Lambda emulator: function {spec.function_name} ({spec.handler}, timeout {spec.timeout_s:g} s, "
            f"max concurrency {args.max_concurrency}) on http://{args.host}:{server.server_port}"
        )
        server.serve_forever()
    finally:
        server.server_close()
        pool.close()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
