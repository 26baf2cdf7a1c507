"""Object-store settings, read from the environment only (never from arguments), and
the retry policy. Secrets never appear in reprs or error messages."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from diffugts.errors import ConfigError
from diffugts.storage.uri import join_uri, parse_s3_uri


def _env_first(env: Mapping[str, str], *names: str) -> tuple[str | None, str | None]:
    for name in names:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None, None


def _require(env: Mapping[str, str], name: str, what: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set ({what} for the object store)")
    return value


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # host[:port], as minio wants it
    secure: bool
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        var, value = _env_first(env, "DIFFUGTS_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        if var is None or value is None:
            raise ConfigError(
                "DIFFUGTS_S3_ENDPOINT is not set (the object store endpoint, e.g. "
                "http://minio-service.kubeflow:9000; AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL also work)"
            )
        endpoint, secure = _parse_endpoint(var, value)
        return cls(
            endpoint=endpoint,
            secure=secure,
            access_key=_require(env, "AWS_ACCESS_KEY_ID", "the access key"),
            secret_key=_require(env, "AWS_SECRET_ACCESS_KEY", "the secret key"),
            session_token=env.get("AWS_SESSION_TOKEN", "").strip() or None,
            region=_env_first(env, "AWS_REGION", "AWS_DEFAULT_REGION")[1],
        )


def _parse_endpoint(var: str, value: str) -> tuple[str, bool]:
    # The value is never echoed: an endpoint URL may carry user:password@.
    if "://" not in value:
        if "/" in value.rstrip("/") or "@" in value:
            raise ConfigError(f"{var}: expected host[:port] or http(s)://host[:port]")
        return value.rstrip("/"), True
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{var}: unsupported scheme {parts.scheme!r} (use http:// or https://)")
    if not parts.hostname or parts.username or parts.path.strip("/") or parts.query:
        raise ConfigError(f"{var}: expected {parts.scheme}://host[:port] with no path or credentials")
    return parts.netloc, parts.scheme == "https"


def default_bucket(env: Mapping[str, str] | None = None) -> str:
    """The results bucket (``DIFFUGTS_BUCKET``) that stages write to unless told otherwise."""
    bucket = _require(os.environ if env is None else env, "DIFFUGTS_BUCKET", "the results bucket")
    parse_s3_uri(f"s3://{bucket}")
    return bucket


def results_uri(*parts: str) -> str:
    """``s3://$DIFFUGTS_BUCKET/<parts...>``."""
    return join_uri(f"s3://{default_bucket()}", *parts)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # in all, the first try included
    base_delay: float = 0.5  # seconds before the first retry (before jitter)
    max_delay: float = 20.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetryPolicy:
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        for var, key, kind in (
            ("DIFFUGTS_S3_ATTEMPTS", "attempts", int),
            ("DIFFUGTS_S3_BACKOFF_S", "base_delay", float),
        ):
            if env.get(var, "").strip():
                try:
                    kwargs[key] = kind(env[var])
                except ValueError:
                    raise ConfigError(f"{var}: expected a number") from None
        policy = cls(**kwargs)
        if policy.attempts < 1 or policy.base_delay < 0:
            raise ConfigError("DIFFUGTS_S3_ATTEMPTS must be >= 1 and DIFFUGTS_S3_BACKOFF_S >= 0")
        return policy

    def delay(self, retry: int) -> float:
        """Wait before retry number ``retry`` (0-based): exponential, with "equal jitter"
        (half fixed, half random) so clients spread out but still back off."""
        step = min(self.max_delay, self.base_delay * 2**retry)
        return step / 2 + random.uniform(0, step / 2)
