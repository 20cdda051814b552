"""The CloudFront stand-in as a Flask app: web/ with explicit content types, cache and security headers."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

from flask import Flask, Response, abort, send_from_directory

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}


def create_app(root: Path, api_base_url: str | None = None) -> Flask:
    app = Flask("static_site", static_folder=None)
    root = root.resolve()
    connect_src = "'self'"
    if api_base_url:
        parsed = urlparse(api_base_url)
        connect_src += f" {parsed.scheme}://{parsed.netloc}"
    else:
        connect_src += " http: https:"  # the API origin is only known to config.js / ?api= at run time

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            f"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src {connect_src}; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        )
        return response

    @app.get("/")
    @app.get("/<path:path>")
    def serve(path: str = "index.html"):
        if path == "config.js" and api_base_url:
            settings = json.dumps({"apiBaseUrl": api_base_url})
            body = f"// Written by static_site --api-base-url.\nwindow.QA_CONFIG = {settings};\n"
            return Response(body, content_type=CONTENT_TYPES[".js"])
        if path.endswith("/"):
            path += "index.html"
        suffix = Path(path).suffix.lower()
        if suffix not in CONTENT_TYPES:
            abort(404)
        response = send_from_directory(root, path, conditional=True, etag=True, max_age=None)
        response.headers["Content-Type"] = CONTENT_TYPES[suffix]
        return response

    return app
