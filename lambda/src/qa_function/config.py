"""The function's configuration: read from the environment once per cold start, typed, validated.

Every setting the function understands is listed here with its default; nothing else reads os.environ.
A typo in a setting name cannot be caught (the environment has many unrelated keys), but every value is
checked, and a bad value fails the cold start loudly instead of degrading requests one by one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# Lambda's synchronous invoke limit is 6 MB; a question-answering request is a few KB. A small cap keeps a
# runaway client from sending megabytes to the model.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_QUESTION_CHARS = 4000
# SageMaker endpoint names: ^[a-zA-Z0-9](-*[a-zA-Z0-9])*, at most 63 characters (the runtime API model).
ENDPOINT_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")


class ConfigError(ValueError):
    """A setting is missing or malformed; raised at the cold start so the function fails to initialise."""


@dataclass(frozen=True)
class FunctionConfig:
    endpoint_name: str
    """ENDPOINT_NAME: the SageMaker endpoint to invoke (required)."""
    cors_allow_origins: tuple[str, ...] = ()
    """CORS_ALLOW_ORIGINS: comma-separated exact origins (e.g. https://chat.example.com) or `*`.
    Empty means no CORS headers at all (same-origin deployments, e.g. CloudFront /api/* behaviour)."""
    cors_allow_credentials: bool = False
    """CORS_ALLOW_CREDENTIALS: send Access-Control-Allow-Credentials; forbids `*` in the allow-list."""
    cors_max_age_s: int = 600
    """CORS_MAX_AGE_S: how long browsers may cache a preflight answer."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """MAX_BODY_BYTES: larger request bodies get 413 before any parsing."""
    max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS
    """MAX_QUESTION_CHARS: longer questions get 413."""
    allow_target_variant: bool = True
    """ALLOW_TARGET_VARIANT: let callers pick a production variant (`target_variant`), for A/B checks."""
    read_timeout_s: float = 25.0
    """SAGEMAKER_READ_TIMEOUT_S: upper bound on one InvokeEndpoint attempt; the cold start lowers it so
    that every attempt together still ends before the function's own timeout (see sagemaker.py)."""
    connect_timeout_s: float = 2.0
    """SAGEMAKER_CONNECT_TIMEOUT_S: TCP connect timeout to the runtime endpoint."""
    max_attempts: int = 2
    """SAGEMAKER_MAX_ATTEMPTS: total attempts (botocore standard retry mode), first try included."""
    default_max_new_tokens: int = 192
    """DEFAULT_MAX_NEW_TOKENS: answer length asked of the model when the caller sets none. The whole call must
    end inside API Gateway's 29 s, so the function bounds it rather than leave it to the endpoint's default."""

    def __post_init__(self) -> None:
        if not self.endpoint_name:
            raise ConfigError("ENDPOINT_NAME is required: the SageMaker endpoint this function invokes")
        if len(self.endpoint_name) > 63 or not ENDPOINT_NAME_RE.match(self.endpoint_name):
            raise ConfigError(f"ENDPOINT_NAME {self.endpoint_name!r} is not a valid SageMaker endpoint name")
        for origin in self.cors_allow_origins:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ConfigError(
                    f"CORS_ALLOW_ORIGINS entry {origin!r} must be an origin like https://host[:port] "
                    "(scheme and host, no path, no trailing slash) or *"
                )
        if self.cors_allow_credentials and "*" in self.cors_allow_origins:
            raise ConfigError("CORS_ALLOW_CREDENTIALS=true cannot be combined with CORS_ALLOW_ORIGINS=*")
        if self.max_body_bytes <= 0 or self.max_question_chars <= 0:
            raise ConfigError("MAX_BODY_BYTES and MAX_QUESTION_CHARS must be positive")
        if self.read_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ConfigError("SAGEMAKER_READ_TIMEOUT_S and SAGEMAKER_CONNECT_TIMEOUT_S must be positive")
        if not 1 <= self.max_attempts <= 10:
            raise ConfigError("SAGEMAKER_MAX_ATTEMPTS must be between 1 and 10")
        if not 1 <= self.default_max_new_tokens <= 1024:
            raise ConfigError("DEFAULT_MAX_NEW_TOKENS must be between 1 and 1024")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FunctionConfig:
        origins = tuple(o.strip() for o in env.get("CORS_ALLOW_ORIGINS", "").split(",") if o.strip())
        return cls(
            endpoint_name=env.get("ENDPOINT_NAME", "").strip(),
            cors_allow_origins=origins,
            cors_allow_credentials=_parse_bool(env, "CORS_ALLOW_CREDENTIALS", False),
            cors_max_age_s=_parse_number(env, "CORS_MAX_AGE_S", 600, int),
            max_body_bytes=_parse_number(env, "MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, int),
            max_question_chars=_parse_number(env, "MAX_QUESTION_CHARS", DEFAULT_MAX_QUESTION_CHARS, int),
            allow_target_variant=_parse_bool(env, "ALLOW_TARGET_VARIANT", True),
            read_timeout_s=_parse_number(env, "SAGEMAKER_READ_TIMEOUT_S", 25.0, float),
            connect_timeout_s=_parse_number(env, "SAGEMAKER_CONNECT_TIMEOUT_S", 2.0, float),
            max_attempts=_parse_number(env, "SAGEMAKER_MAX_ATTEMPTS", 2, int),
            default_max_new_tokens=_parse_number(env, "DEFAULT_MAX_NEW_TOKENS", 192, int),
        )


def _parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


def _parse_number(env: Mapping[str, str], name: str, default, kind):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from e
