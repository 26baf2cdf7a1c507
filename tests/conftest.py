"""Shared fixtures. Services the tests need run for real on loopback, started here."""

from pushgateway import pushgateway_url  # noqa: F401
from s3server import s3_env, s3_server  # noqa: F401  (pytest finds fixtures by name)
