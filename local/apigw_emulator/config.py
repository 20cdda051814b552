"""The API Gateway emulator's settings: flags, each with an environment variable for compose."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

# API Gateway's fixed limits and defaults.
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
INTEGRATION_TIMEOUT_S = 29.0
# Account-level default throttle (requests/s, burst); a usage plan usually sets much lower numbers.
DEFAULT_RATE, DEFAULT_BURST = 10_000.0, 5_000


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 3000
    lambda_endpoint_url: str = "http://127.0.0.1:3001"
    function_name: str = "qa-function"
    region: str = "us-east-1"
    payload_format: str = "1.0"
    """1.0 = REST API proxy event, 2.0 = HTTP API event."""
    stage: str = "prod"
    api_keys: frozenset[str] = frozenset()
    """When non-empty, every non-OPTIONS request needs one of these in x-api-key (else 403)."""
    throttle_rate: float = DEFAULT_RATE
    throttle_burst: int = DEFAULT_BURST
    integration_timeout_s: float = INTEGRATION_TIMEOUT_S
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    binary_media_types: tuple[str, ...] = ()
    gateway_responses_allow_origin: str | None = None

    def __post_init__(self) -> None:
        if self.payload_format not in ("1.0", "2.0"):
            raise ValueError(f"payload format must be 1.0 (REST) or 2.0 (HTTP API), not {self.payload_format!r}")
        if self.throttle_rate <= 0 or self.throttle_burst < 1:
            raise ValueError("throttle rate must be positive and burst at least 1")
        if not 0 < self.integration_timeout_s <= 900:
            raise ValueError("integration timeout must be in (0, 900] seconds")
        if any(len(k) < 20 for k in self.api_keys):
            raise ValueError("API keys must be at least 20 characters, like API Gateway's")


def parse_args(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> GatewayConfig:
    p = argparse.ArgumentParser(prog="python -m apigw_emulator", description="Local API Gateway -> Lambda proxy")
    p.add_argument("--host", default=env.get("APIGW_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env.get("APIGW_PORT", "3000")))
    p.add_argument(
        "--lambda-endpoint-url",
        default=env.get("AWS_ENDPOINT_URL_LAMBDA", "http://127.0.0.1:3001"),
        help="Lambda Invoke API: our lambda_runtime_emulator or the AWS Lambda RIE",
    )
    p.add_argument("--function-name", default=env.get("APIGW_FUNCTION_NAME", "qa-function"))
    p.add_argument(
        "--payload-format",
        choices=["1.0", "2.0"],
        default=env.get("APIGW_PAYLOAD_FORMAT", "1.0"),
        help="1.0: REST API proxy events; 2.0: HTTP API events",
    )
    p.add_argument("--stage", default=env.get("APIGW_STAGE"), help="default: prod (1.0) or $default (2.0)")
    p.add_argument(
        "--api-keys",
        default=env.get("APIGW_API_KEYS", ""),
        help="comma-separated keys; when set, x-api-key is required (403 otherwise)",
    )
    p.add_argument("--throttle-rate", type=float, default=float(env.get("APIGW_THROTTLE_RATE", DEFAULT_RATE)))
    p.add_argument("--throttle-burst", type=int, default=int(env.get("APIGW_THROTTLE_BURST", DEFAULT_BURST)))
    p.add_argument(
        "--integration-timeout",
        type=float,
        default=float(env.get("APIGW_INTEGRATION_TIMEOUT_S", INTEGRATION_TIMEOUT_S)),
    )
    p.add_argument("--max-payload-bytes", type=int, default=int(env.get("APIGW_MAX_PAYLOAD_BYTES", MAX_PAYLOAD_BYTES)))
    p.add_argument("--binary-media-types", default=env.get("APIGW_BINARY_MEDIA_TYPES", ""))
    p.add_argument(
        "--gateway-responses-allow-origin",
        default=env.get("APIGW_GATEWAY_RESPONSES_ALLOW_ORIGIN") or None,
        help="Access-Control-Allow-Origin value on the gateway's own 403/413/429/5xx answers",
    )
    a = p.parse_args(argv)
    try:
        return GatewayConfig(
            host=a.host,
            port=a.port,
            lambda_endpoint_url=a.lambda_endpoint_url,
            function_name=a.function_name,
            region=env.get("AWS_REGION", "us-east-1"),
            payload_format=a.payload_format,
            stage=a.stage or ("prod" if a.payload_format == "1.0" else "$default"),
            api_keys=frozenset(k.strip() for k in a.api_keys.split(",") if k.strip()),
            throttle_rate=a.throttle_rate,
            throttle_burst=a.throttle_burst,
            integration_timeout_s=a.integration_timeout,
            max_payload_bytes=a.max_payload_bytes,
            binary_media_types=tuple(t.strip() for t in a.binary_media_types.split(",") if t.strip()),
            gateway_responses_allow_origin=a.gateway_responses_allow_origin,
        )
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable: p.error exits
