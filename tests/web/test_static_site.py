"""The CloudFront stand-in: content types, cache and security headers, config.js at deploy time."""

from __future__ import annotations

import pytest
from lambda_fn.local_stack import REPO
from static_site.app import create_app

WEB = REPO / "web"


@pytest.fixture
def client():
    return create_app(WEB).test_client()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/index.html", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/config.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
    ],
)
def test_content_types_and_headers(client, path, content_type):
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == content_type
    assert r.headers["Cache-Control"] == "no-cache"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["ETag"]


def test_revalidation_gets_304(client):
    etag = client.get("/app.js").headers["ETag"]
    assert client.get("/app.js", headers={"If-None-Match": etag}).status_code == 304


@pytest.mark.parametrize("path", ["/missing.html", "/../pyproject.toml", "/%2e%2e/README.md", "/app.py"])
def test_unknown_and_escaping_paths_are_404(client, path):
    assert client.get(path).status_code == 404


def test_api_base_url_rewrites_config_js_and_csp():
    client = create_app(WEB, api_base_url="https://api.example.com/prod").test_client()
    r = client.get("/config.js")
    assert 'window.QA_CONFIG = {"apiBaseUrl": "https://api.example.com/prod"};' in r.get_data(as_text=True)
    assert "connect-src 'self' https://api.example.com;" in client.get("/").headers["Content-Security-Policy"]


def test_page_loads_no_external_assets():
    html = (WEB / "index.html").read_text()
    for asset in ("config.js", "app.js", "style.css"):
        assert f'"{asset}"' in html
    for attr in ('src="http', "src='http", 'href="http', "href='http", 'src="//', 'href="//'):
        assert attr not in html  # no CDN: the page must work on a closed network
    assert "<script>" not in html  # no inline script: the CSP forbids it
