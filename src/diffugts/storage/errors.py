"""Object-store failures: which are transient (retried), and the one-line errors the
rest become."""

from __future__ import annotations

from collections.abc import Iterable

import urllib3
from minio.error import InvalidResponseError, S3Error, ServerError

from diffugts.errors import DiffugtsError
from diffugts.storage.uri import parse_s3_uri

TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "XMinioServerNotInitialized",
    }
)
AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "InvalidSecurity",
    }
)


class StorageError(DiffugtsError):
    """An object-store failure the user can act on; ``str()`` is ``"<uri>: <reason>"``."""

    def __init__(self, uri: str, reason: str, code: str | None = None):
        self.uri, self.reason, self.code = uri, reason, code
        super().__init__(f"{uri}: {reason}")


class ObjectNotFound(StorageError):
    """NoSuchKey / NoSuchBucket (``code`` says which)."""


class AccessDenied(StorageError):
    """Bad or insufficient credentials."""


class StoreUnavailable(StorageError):
    """Transient failures that outlasted the retry policy."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_CODES or getattr(exc.response, "status", 0) >= 500
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):  # a non-XML answer, e.g. an HTML 502 from a proxy
        status = getattr(exc, "_code", 0) or 0
        return status == 429 or status >= 500
    if _in_chain(exc, urllib3.exceptions.SSLError):
        return False  # a certificate problem does not heal by waiting
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _in_chain(exc: BaseException | None, kind: type) -> bool:
    return any(isinstance(e, kind) for e in _chain(exc))


def _chain(exc: BaseException | None) -> Iterable[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        reason = getattr(exc, "reason", None)  # urllib3 MaxRetryError keeps its cause here
        exc = reason if isinstance(reason, BaseException) else (exc.__cause__ or exc.__context__)


def brief(exc: BaseException) -> str:
    """The root cause in a few words, e.g. "Connection refused" or "SlowDown: ..."."""
    for e in _chain(exc):
        if isinstance(e, S3Error):
            return f"{e.code}: {e.message}"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        if isinstance(e, ConnectionError) and str(e):
            return str(e)  # e.g. http.client.RemoteDisconnected
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def translate(uri: str, exc: BaseException) -> BaseException:
    """A one-line StorageError for S3 failures; other exceptions are returned unchanged."""
    if isinstance(exc, S3Error):
        code = exc.code or "Error"
        if code == "NoSuchKey":
            return ObjectNotFound(uri, "no such object", code)
        if code == "NoSuchBucket":
            return ObjectNotFound(uri, f"no such bucket {exc.bucket_name or parse_s3_uri(uri)[0]!r}", code)
        if code in AUTH_CODES:
            hint = "AWS_SESSION_TOKEN" if "Token" in code else "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            return AccessDenied(uri, f"access denied ({code}; check {hint})", code)
        return StorageError(uri, brief(exc), code)
    if isinstance(exc, (ServerError, InvalidResponseError)):
        return StorageError(uri, f"unexpected response from the object store: {brief(exc)}")
    if _in_chain(exc, urllib3.exceptions.SSLError):
        return StorageError(uri, f"TLS error: {brief(exc)} (set SSL_CERT_FILE, or use an http:// endpoint)")
    return exc
