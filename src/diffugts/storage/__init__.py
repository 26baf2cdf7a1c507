"""Object store access (S3, MinIO, SeaweedFS) for stage inputs and artifacts, via the minio SDK.

- ``uri``: ``s3://bucket/key`` parsing; a prefix URI names a folder.
- ``settings``: endpoint and credentials from the environment only; the retry policy.
- ``errors``: transient vs. permanent failures, and the one-line errors users see.
- ``store``: ``ObjectStore`` (objects, prefixes, manifest-last artifacts) and ``localize``.
- ``location``: the same few calls on a local path or an ``s3://`` URI (read bytes or JSON,
  write JSON atomically, publish a folder marker-last, list a folder's children).

Multi-file artifacts are published manifest-last: the old ``_manifest.json`` is removed,
every file is uploaded (sha256 in its metadata), then the new manifest is written. A
reader that finds no manifest refuses the prefix; one that finds it verifies every file's
size and sha256. See docs/storage.md.
"""

from diffugts.storage.errors import AccessDenied, ObjectNotFound, StorageError, StoreUnavailable
from diffugts.storage.settings import RetryPolicy, S3Settings, default_bucket, results_uri
from diffugts.storage.store import MANIFEST, ObjectInfo, ObjectStore, localize
from diffugts.storage.uri import is_s3_uri, join_uri, parse_s3_uri

__all__ = [
    "MANIFEST",
    "AccessDenied",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "RetryPolicy",
    "S3Settings",
    "StorageError",
    "StoreUnavailable",
    "default_bucket",
    "is_s3_uri",
    "join_uri",
    "localize",
    "parse_s3_uri",
    "results_uri",
]
