"""Run the SageMaker Runtime endpoint emulator.

    python -m runtime_emulator --config local/runtime_emulator/endpoints.example.yaml --port 8081
    python -m runtime_emulator --endpoint chat=http://127.0.0.1:8080            # one variant, no file
    export AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=http://127.0.0.1:8081             # then unmodified boto3

Every flag has an environment variable (RUNTIME_EMULATOR_*), so compose and the no-Docker runner can
configure it the same way; a flag wins over its variable, and both win over the config file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .config import ConfigError, EmulatorConfig, load_config_file, parse_config, parse_endpoint_shorthand

log = logging.getLogger("runtime_emulator")


def make_parser(env: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime_emulator",
        description="Serve the SageMaker Runtime API (InvokeEndpoint, InvokeEndpointWithResponseStream) "
        "in front of local serving containers.",
    )
    parser.add_argument(
        "--config",
        default=env.get("RUNTIME_EMULATOR_CONFIG"),
        help="YAML or JSON file mapping endpoints to production variants [RUNTIME_EMULATOR_CONFIG]",
    )
    parser.add_argument(
        "--endpoint",
        action="append",
        default=None,
        metavar="NAME=URL",
        help="add an endpoint with one variant (AllTraffic) served by the container at URL; repeatable "
        "[RUNTIME_EMULATOR_ENDPOINTS, comma-separated]",
    )
    parser.add_argument(
        "--host",
        default=env.get("RUNTIME_EMULATOR_HOST", "127.0.0.1"),
        help="interface to listen on; 0.0.0.0 inside a container [RUNTIME_EMULATOR_HOST]",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env.get("RUNTIME_EMULATOR_PORT", "8081")),
        help="port to listen on (default 8081) [RUNTIME_EMULATOR_PORT]",
    )
    parser.add_argument(
        "--invocation-timeout",
        type=float,
        default=_optional_float(env.get("RUNTIME_EMULATOR_INVOCATION_TIMEOUT_S")),
        help="seconds a container has to answer (default 60, as SageMaker) [RUNTIME_EMULATOR_INVOCATION_TIMEOUT_S]",
    )
    parser.add_argument(
        "--routing-seed",
        type=int,
        default=_optional_int(env.get("RUNTIME_EMULATOR_ROUTING_SEED")),
        help="seed for the weighted variant split, for reproducible A/B runs [RUNTIME_EMULATOR_ROUTING_SEED]",
    )
    parser.add_argument(
        "--log-level",
        default=env.get("RUNTIME_EMULATOR_LOG_LEVEL", "INFO"),
        help="[RUNTIME_EMULATOR_LOG_LEVEL]",
    )
    return parser


def _optional_float(value: str | None) -> float | None:
    return float(value) if value else None


def _optional_int(value: str | None) -> int | None:
    return int(value) if value else None


def build_config(args: argparse.Namespace, env: dict[str, str]) -> EmulatorConfig:
    data: dict[str, Any] = load_config_file(args.config) if args.config else {}
    endpoints = dict(data.get("endpoints") or {})
    specs = args.endpoint or [s for s in env.get("RUNTIME_EMULATOR_ENDPOINTS", "").split(",") if s.strip()]
    for spec in specs:
        name, endpoint = parse_endpoint_shorthand(spec)
        if name in endpoints:
            raise ConfigError(f"endpoint {name!r} is defined twice (config file and --endpoint)")
        endpoints[name] = endpoint
    if not endpoints:
        raise ConfigError(
            "no endpoints configured: pass --config FILE or --endpoint NAME=URL "
            "(or set RUNTIME_EMULATOR_CONFIG / RUNTIME_EMULATOR_ENDPOINTS)"
        )
    data["endpoints"] = endpoints
    if args.invocation_timeout is not None:
        data["invocation_timeout_s"] = args.invocation_timeout
    if args.routing_seed is not None:
        data["routing_seed"] = args.routing_seed
    return parse_config(data)


def _event_loop():
    """uvloop where installed (it is pinned in local/requirements.txt): the same asyncio code with a
    libuv loop costs less CPU per relayed request; the standard loop works too."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    env = dict(os.environ)
    args = make_parser(env).parse_args(argv)

    from .logs import configure_logging

    configure_logging(args.log_level)
    try:
        config = build_config(args, env)
    except ConfigError as exc:
        log.error("invalid configuration", extra={"error": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from aiohttp import web

    from .app import create_app

    log.info(
        "endpoint emulator listening",
        extra={
            "url": f"http://{args.host}:{args.port}",
            "endpoints": {
                n: [f"{v.name}={v.url} (weight {v.weight:g})" for v in e.variants] for n, e in config.endpoints.items()
            },
            "hint": f"export AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=http://{args.host}:{args.port}",
        },
    )
    web.run_app(create_app(config), host=args.host, port=args.port, access_log=None, print=None, loop=_event_loop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
