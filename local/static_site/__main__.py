"""Serve web/ the way CloudFront in front of S3 would (local-only stand-in).

    .venv/bin/python -m static_site --port 8000 --root web --api-base-url http://127.0.0.1:3000/prod

Environment equivalents: WEB_HOST, WEB_PORT, WEB_ROOT, WEB_API_BASE_URL.
  * Content types set explicitly for the few types the page uses (the host's mimetypes table varies).
  * Cache-Control: the file names are not content-hashed, so everything is `no-cache` (revalidate with the
    ETag every time; a 304 is cheap), instead of a max-age that would serve a stale app.js after a deploy.
  * `/` serves index.html (CloudFront's default root object); unknown paths are 404, never a listing.
  * --api-base-url replaces config.js with one naming that URL, as a deploy step would upload its own
    config.js next to the page. Without it, web/config.js is served as is.
  * Response headers a CloudFront response-headers policy would add: nosniff, a strict CSP (no inline
    script, no third-party origins; connect-src allows the API), no referrer.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from werkzeug.serving import make_server

from static_site.app import create_app


def main(argv: list[str] | None = None) -> None:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m static_site", description="CloudFront stand-in for web/")
    parser.add_argument("--host", default=env.get("WEB_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env.get("WEB_PORT", "8000")))
    parser.add_argument("--root", type=Path, default=Path(env.get("WEB_ROOT", "web")))
    parser.add_argument("--api-base-url", default=env.get("WEB_API_BASE_URL") or None)
    args = parser.parse_args(argv)
    if not (args.root / "index.html").is_file():
        parser.error(f"{args.root}/index.html not found (run from the repository root or pass --root)")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(args.host, args.port, create_app(args.root, args.api_base_url), threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    api = args.api_base_url or "from web/config.js"
    print(f"Chat page: http://{args.host}:{server.server_port}/  (API: {api})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
