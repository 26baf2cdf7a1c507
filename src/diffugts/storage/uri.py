"""``s3://bucket/key`` URIs.

A "prefix" URI names a folder: ``s3://b/a/x`` and ``s3://b/a/x/`` both mean the keys
under ``a/x/``, never ``a/x2``.
"""

from __future__ import annotations

from pathlib import Path

from minio.helpers import check_bucket_name

from diffugts.errors import InputError


def is_s3_uri(s: object) -> bool:
    return isinstance(s, str) and s.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/key/prefix"`` -> ``("bucket", "key/prefix")``; the key may be empty."""
    if not is_s3_uri(uri):
        raise InputError(str(uri), "malformed S3 URI: expected s3://bucket[/key]")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise InputError(uri, "malformed S3 URI: no bucket name")
    try:
        check_bucket_name(bucket, strict=True)
    except ValueError:
        raise InputError(uri, f"malformed S3 URI: invalid bucket name {bucket!r}") from None
    if any(c in key for c in "\r\n\0"):
        raise InputError(ascii(uri), "malformed S3 URI: control character in key")
    if any(seg in (".", "..") for seg in key.split("/")):
        # The minio SDK refuses these, and they must never climb out of a local mirror.
        raise InputError(uri, "malformed S3 URI: '.' or '..' path segment in key")
    return bucket, key


def parse_object_uri(uri: str) -> tuple[str, str]:
    """Like :func:`parse_s3_uri`, for a single object (the key may not be empty or end in /)."""
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise InputError(uri, "expected an object URI (s3://bucket/key), got a bucket or folder")
    return bucket, key


def join_uri(base: str, *parts: str) -> str:
    bucket, key = parse_s3_uri(base)
    segments = [s.strip("/") for s in (key, *parts) if s.strip("/")]
    return f"s3://{bucket}/" + "/".join(segments)


def folder_prefix(key: str) -> str:
    """The listing prefix for a folder key: ``"a/x"`` -> ``"a/x/"``; ``""`` is the bucket."""
    return key.rstrip("/") + "/" if key.strip("/") else ""


def local_relpath(uri: str, rel: str) -> Path:
    """A key (suffix) as a relative local path, refusing anything that could leave dest
    (other S3 servers may hold keys with empty or dot segments)."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise InputError(uri, "key cannot be mirrored to a local path safely")
    return Path(*parts)
