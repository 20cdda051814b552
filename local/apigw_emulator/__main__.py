"""Run the API Gateway emulator in front of the Lambda emulator.

    .venv/bin/python -m apigw_emulator --port 3000 --lambda-endpoint-url http://127.0.0.1:3001 \\
        [--payload-format 1.0|2.0] [--api-keys KEY1,KEY2] [--throttle-rate 10 --throttle-burst 20]

Environment equivalents: APIGW_HOST, APIGW_PORT, AWS_ENDPOINT_URL_LAMBDA, APIGW_FUNCTION_NAME,
APIGW_PAYLOAD_FORMAT, APIGW_STAGE, APIGW_API_KEYS, APIGW_THROTTLE_RATE, APIGW_THROTTLE_BURST,
APIGW_INTEGRATION_TIMEOUT_S, APIGW_MAX_PAYLOAD_BYTES, APIGW_BINARY_MEDIA_TYPES,
APIGW_GATEWAY_RESPONSES_ALLOW_ORIGIN. URLs work with the stage prefix (/prod/ask, like execute-api) and
without it (/ask, like a custom domain).
"""

from __future__ import annotations

import logging
import signal
import sys

from werkzeug.serving import make_server

from apigw_emulator.app import create_app
from apigw_emulator.config import parse_args


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the app logs one JSON line per request
    server = make_server(config.host, config.port, create_app(config), threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    keys = f"{len(config.api_keys)} API key(s) required" if config.api_keys else "no API key"
    print(
        f"API Gateway emulator: payload {config.payload_format}, stage {config.stage}, {keys}, "
        f"throttle {config.throttle_rate:g}/s burst {config.throttle_burst}, "
        f"timeout {config.integration_timeout_s:g} s -> {config.lambda_endpoint_url} "
        f"({config.function_name}) "
        f"on http://{config.host}:{server.server_port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
