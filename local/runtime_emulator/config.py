"""Typed configuration of the endpoint emulator, parsed once at the edge.

An endpoint maps to one or more production variants, each a serving container reachable over HTTP:

    invocation_timeout_s: 60          # SageMaker's hard limit for a container answer
    endpoints:
      chat:
        variants:
          - {name: tuned, url: "http://127.0.0.1:8080", weight: 0.8}
          - {name: base,  url: "http://127.0.0.1:8082", weight: 0.2}

The same file may be JSON. Unknown keys fail loudly, so a typo never silently changes routing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Limits from the SageMaker Runtime service model (botocore sagemaker-runtime/2017-05-13/service-2.json).
MAX_BODY_BYTES = 6_291_456  # BodyBlob max
ENDPOINT_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
VARIANT_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
DEFAULT_VARIANT_NAME = "AllTraffic"  # what the SageMaker SDK names a single variant


class ConfigError(ValueError):
    """The emulator configuration is invalid; the message says which key and why."""


@dataclass(frozen=True)
class Variant:
    name: str
    url: str  # base URL of the serving container, e.g. http://127.0.0.1:8080
    weight: float = 1.0

    @property
    def invocations_url(self) -> str:
        return self.url.rstrip("/") + "/invocations"

    @property
    def ping_url(self) -> str:
        return self.url.rstrip("/") + "/ping"


@dataclass(frozen=True)
class Endpoint:
    name: str
    variants: tuple[Variant, ...]

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


@dataclass(frozen=True)
class EmulatorConfig:
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    # Seconds a container has to send its response headers (and, when streaming, each next chunk).
    invocation_timeout_s: float = 60.0
    # Seconds to open a TCP connection to a container; refused connections fail at once regardless.
    connect_timeout_s: float = 2.0
    # SageMaker's /ping rule: each health check must answer within 2 s.
    ping_timeout_s: float = 2.0
    max_body_bytes: int = MAX_BODY_BYTES
    region: str = "us-east-1"
    account_id: str = "000000000000"
    # Seeds the traffic-split random generator; None draws from the OS.
    routing_seed: int | None = None


_TOP_LEVEL_KEYS = {
    "endpoints",
    "invocation_timeout_s",
    "connect_timeout_s",
    "ping_timeout_s",
    "max_body_bytes",
    "region",
    "account_id",
    "routing_seed",
}
_ENDPOINT_KEYS = {"variants"}
_VARIANT_KEYS = {"name", "url", "weight"}


def _reject_unknown(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _parse_url(where: str, url: Any) -> str:
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"{where}: url must be an http(s) URL like http://127.0.0.1:8080, got {url!r}")
    return url.rstrip("/")


def _parse_variant(where: str, data: Any) -> Variant:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a variant must be a mapping with name, url and weight")
    _reject_unknown(where, data, _VARIANT_KEYS)
    name = data.get("name", DEFAULT_VARIANT_NAME)
    if not isinstance(name, str) or not VARIANT_NAME_PATTERN.match(name):
        raise ConfigError(f"{where}: variant name {name!r} must match {VARIANT_NAME_PATTERN.pattern}")
    weight = data.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise ConfigError(f"{where}: weight must be a number >= 0, got {weight!r}")
    return Variant(name=name, url=_parse_url(where, data.get("url")), weight=float(weight))


def _parse_endpoint(name: str, data: Any) -> Endpoint:
    where = f"endpoints.{name}"
    if not ENDPOINT_NAME_PATTERN.match(name):
        raise ConfigError(f"{where}: endpoint name must match {ENDPOINT_NAME_PATTERN.pattern}")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping with a 'variants' list")
    _reject_unknown(where, data, _ENDPOINT_KEYS)
    raw_variants = data.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ConfigError(f"{where}.variants: needs at least one variant")
    variants = tuple(_parse_variant(f"{where}.variants[{i}]", v) for i, v in enumerate(raw_variants))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.variants: variant names must be unique, got {names}")
    if not any(v.weight > 0 for v in variants):
        raise ConfigError(f"{where}.variants: at least one variant needs a weight > 0")
    return Endpoint(name=name, variants=variants)


def _positive_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key}: must be a number > 0, got {value!r}")
    return float(value)


def parse_config(data: dict[str, Any]) -> EmulatorConfig:
    """Build a validated config from plain data (a parsed YAML/JSON document)."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping with an 'endpoints' key")
    _reject_unknown("config", data, _TOP_LEVEL_KEYS)
    raw_endpoints = data.get("endpoints") or {}
    if not isinstance(raw_endpoints, dict):
        raise ConfigError("endpoints: must map endpoint names to {variants: [...]}")
    defaults = EmulatorConfig()
    seed = data.get("routing_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"routing_seed: must be an integer, got {seed!r}")
    max_body = data.get("max_body_bytes", defaults.max_body_bytes)
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body <= 0:
        raise ConfigError(f"max_body_bytes: must be an integer > 0, got {max_body!r}")
    return EmulatorConfig(
        endpoints={name: _parse_endpoint(str(name), ep) for name, ep in raw_endpoints.items()},
        invocation_timeout_s=_positive_number(
            "invocation_timeout_s", data.get("invocation_timeout_s", defaults.invocation_timeout_s)
        ),
        connect_timeout_s=_positive_number(
            "connect_timeout_s", data.get("connect_timeout_s", defaults.connect_timeout_s)
        ),
        ping_timeout_s=_positive_number("ping_timeout_s", data.get("ping_timeout_s", defaults.ping_timeout_s)),
        max_body_bytes=max_body,
        region=str(data.get("region", defaults.region)),
        account_id=str(data.get("account_id", defaults.account_id)),
        routing_seed=seed,
    )


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into plain data (JSON is valid YAML, but JSON errors read better)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
    import yaml  # only needed for YAML files

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def parse_endpoint_shorthand(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse `NAME=URL` (one variant named AllTraffic) for the CLI flag and the env var.

    Several variants need the config file; this covers the common single-container case without one.
    """
    name, sep, url = spec.partition("=")
    if not sep or not name.strip() or not url.strip():
        raise ConfigError(f"endpoint {spec!r}: expected NAME=URL, e.g. chat=http://127.0.0.1:8080")
    return name.strip(), {"variants": [{"name": DEFAULT_VARIANT_NAME, "url": url.strip(), "weight": 1.0}]}
