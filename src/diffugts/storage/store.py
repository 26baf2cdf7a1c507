"""``ObjectStore``: S3 operations on ``s3://`` URIs, artifacts published manifest-last,
and ``localize`` for stage inputs.

Every S3 call goes through one retry layer (``ObjectStore._call``) that knows S3 error
codes; urllib3's own retries are switched off so the policy lives in one place. Callers
outside this module use the public methods (``list_entries`` and ``stat`` for listings and
object details), never ``_call``.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import hashlib
import io
import json
import logging
import mimetypes
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import certifi
import urllib3
from minio import Minio

from diffugts import __version__
from diffugts.errors import InputError
from diffugts.storage.errors import (
    ObjectNotFound,
    StorageError,
    StoreUnavailable,
    brief,
    is_transient,
    translate,
)
from diffugts.storage.settings import RetryPolicy, S3Settings
from diffugts.storage.uri import (
    folder_prefix,
    is_s3_uri,
    join_uri,
    local_relpath,
    parse_object_uri,
    parse_s3_uri,
)
from diffugts.utils.atomic import atomic_path, staging_dir

log = logging.getLogger("diffugts.storage")

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = "diffugts-artifact/1"
_SHA_META = "sha256"  # stored by S3 as the x-amz-meta-sha256 header
_CHUNK = 1 << 20
_T = TypeVar("_T")


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a stat tells about one key."""

    key: str  # the full key; a sub-prefix of a non-recursive listing ends in "/"
    is_dir: bool  # the key ends in "/": a sub-prefix of a non-recursive listing, or a folder marker
    size: int | None
    etag: str | None  # the store's content checksum


class ObjectStore:
    """S3 operations on ``s3://`` URIs with retries, integrity checks and atomic local writes."""

    def __init__(
        self,
        settings: S3Settings | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
        workers: int = 8,
    ):
        self.settings = settings or S3Settings.from_env()
        self.retry = retry or RetryPolicy.from_env()
        self.workers = max(1, workers)
        s = self.settings
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout, 10.0), read=timeout),
            retries=False,  # ours is the only retry layer (see _call)
            maxsize=self.workers + 2,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self.client = Minio(
            s.endpoint,
            access_key=s.access_key,
            secret_key=s.secret_key,
            session_token=s.session_token,
            secure=s.secure,
            region=s.region,
            http_client=http,
        )

    def __repr__(self) -> str:
        return f"ObjectStore({self.settings.url})"

    def _call(self, uri: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run ``fn`` with retries on transient failures; map S3 errors to one-liners."""
        n = self.retry.attempts
        for attempt in range(1, n + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    err = translate(uri, exc)
                    if err is exc:
                        raise
                    raise err from exc
                if attempt == n:
                    raise StoreUnavailable(
                        uri,
                        f"object store at {self.settings.url} failed after {n} attempt"
                        f"{'s' if n > 1 else ''}: {brief(exc)}",
                    ) from exc
                delay = self.retry.delay(attempt - 1)
                log.warning("%s: %s; retry %d of %d in %.2f s", uri, brief(exc), attempt, n - 1, delay)
                self.retry.sleep(delay)
        raise AssertionError("unreachable")

    def _parallel(self, fn: Callable[[Any], _T], items: Iterable[Any]) -> list[_T]:
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            futures = [pool.submit(fn, i) for i in items]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    # -- single objects

    def ensure_bucket(self, bucket: str) -> None:
        uri = f"s3://{bucket}"
        parse_s3_uri(uri)
        if self._call(uri, self.client.bucket_exists, bucket):
            return
        try:
            self._call(uri, self.client.make_bucket, bucket)
        except StorageError as err:
            if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def upload_file(self, path: str | os.PathLike, uri: str) -> str:
        """Upload one file; returns its sha256 (also stored in the object's metadata)."""
        return self._upload(Path(path), uri)[1]

    def _upload(self, path: Path, uri: str) -> tuple[int, str]:
        bucket, key = parse_object_uri(uri)
        if not path.is_file():
            raise InputError(path, "not a file")
        size, digest = _sha256_file(path)
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._call(
            uri, self.client.fput_object, bucket, key, str(path), content_type=ctype, metadata={_SHA_META: digest}
        )
        return size, digest

    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        bucket, key = parse_object_uri(uri)
        meta: dict[str, str | list[str] | tuple[str]] = {_SHA_META: hashlib.sha256(data).hexdigest()}
        # A fresh stream per attempt: a retry must resend from the start.
        self._call(
            uri,
            lambda: self.client.put_object(
                bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata=meta
            ),
        )

    def get_bytes(self, uri: str) -> bytes:
        def attempt() -> bytes:
            buf = bytearray()
            self._get(uri, buf.extend)
            return bytes(buf)

        return self._call(uri, attempt)

    def download_file(self, uri: str, path: str | os.PathLike) -> Path:
        """Download one object to ``path`` atomically (verified against its sha256 metadata)."""
        self._download(uri, Path(path))
        return Path(path)

    def _download(self, uri: str, path: Path) -> tuple[int, str]:
        def attempt() -> tuple[int, str]:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                return self._get(uri, f.write)

        return self._call(uri, attempt)

    def _get(self, uri: str, write: Callable[[bytes], Any]) -> tuple[int, str]:
        bucket, key = parse_object_uri(uri)
        resp = self.client.get_object(bucket, key)
        try:
            h, size = hashlib.sha256(), 0
            # decode_content=False: hash the stored bytes, whatever Content-Encoding says.
            for chunk in resp.stream(_CHUNK, decode_content=False):
                write(chunk)
                h.update(chunk)
                size += len(chunk)
            expected = resp.headers.get(f"x-amz-meta-{_SHA_META}")
        finally:
            resp.close()
            resp.release_conn()
        digest = h.hexdigest()
        if expected and expected != digest:
            raise InputError(uri, f"sha256 mismatch: object metadata says {expected}, data is {digest}")
        return size, digest

    def stat(self, uri: str) -> ObjectInfo:
        """Size and ETag of one object (``ObjectNotFound`` when there is none)."""
        bucket, key = parse_object_uri(uri)
        st = self._call(uri, self.client.stat_object, bucket, key)
        return ObjectInfo(key, False, st.size, st.etag)

    def exists(self, uri: str) -> bool:
        bucket, key = parse_object_uri(uri)
        try:
            self._call(uri, self.client.stat_object, bucket, key)
        except ObjectNotFound:
            return False
        return True

    # -- prefixes

    def list(self, uri_prefix: str) -> builtins.list[str]:
        """URIs of all objects under the folder ``uri_prefix``, recursively, sorted."""
        bucket, prefix = parse_s3_uri(uri_prefix)
        return [f"s3://{bucket}/{k}" for k in self._keys(uri_prefix, bucket, folder_prefix(prefix))]

    def list_entries(self, uri_prefix: str, *, recursive: bool = False) -> builtins.list[ObjectInfo]:
        """What lies under the folder ``uri_prefix``, in the store's order: with ``recursive``
        every object at any depth, else the objects and sub-prefixes directly under it (one
        delimiter listing: a folder of studies costs one entry per study, not one per file).
        Folder-marker keys ending in "/" are kept; callers skip what they do not want."""
        bucket, key = parse_s3_uri(uri_prefix)
        prefix = folder_prefix(key)
        objs = self._call(
            uri_prefix, lambda: list(self.client.list_objects(bucket, prefix=prefix, recursive=recursive))
        )
        return [ObjectInfo(o.object_name, o.is_dir, o.size, o.etag) for o in objs]

    def _keys(self, uri: str, bucket: str, prefix: str) -> builtins.list[str]:
        objs = self._call(uri, lambda: list(self.client.list_objects(bucket, prefix=prefix, recursive=True)))
        # Keys ending in "/" are folder markers some tools write; they hold no data.
        return sorted(o.object_name for o in objs if not o.object_name.endswith("/"))

    def download_prefix(self, uri: str, dest_dir: str | os.PathLike) -> builtins.list[Path]:
        """Mirror every object under the folder ``uri`` into ``dest_dir``; returns the paths."""
        bucket, key = parse_s3_uri(uri)
        prefix, dest = folder_prefix(key), Path(dest_dir)
        uris = [(f"s3://{bucket}/{k}", k[len(prefix) :]) for k in self._keys(uri, bucket, prefix)]
        _check_mirrorable(uri, [rel for _, rel in uris])
        jobs = [(obj, dest / local_relpath(obj, rel)) for obj, rel in uris]
        return self._parallel(lambda job: self.download_file(*job), jobs)

    def upload_dir(self, local_dir: str | os.PathLike, uri: str) -> builtins.list[str]:
        """Upload every file under ``local_dir`` to the folder ``uri``; returns the URIs."""
        local = Path(local_dir)
        files = _local_files(local)
        self._parallel(lambda rel: self._upload(local / rel, join_uri(uri, rel)), files)
        return [join_uri(uri, rel) for rel in files]

    # -- artifacts (manifest written last)

    def publish_dir(
        self, local_dir: str | os.PathLike, uri: str, meta: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Publish ``local_dir`` as a complete artifact at ``uri``; returns the manifest."""
        local = Path(local_dir)
        files = _local_files(local)
        if MANIFEST in files:
            raise InputError(local / MANIFEST, "name reserved for the artifact manifest")
        if not files:
            raise InputError(local, "no files to publish")
        manifest_uri = join_uri(uri, MANIFEST)
        bucket, manifest_key = parse_s3_uri(manifest_uri)
        # Readers take the manifest to mean "complete": withdraw it before any file changes.
        self._call(manifest_uri, self.client.remove_object, bucket, manifest_key)
        results = self._parallel(lambda rel: self._upload(local / rel, join_uri(uri, rel)), files)
        manifest = {
            "format": MANIFEST_FORMAT,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "diffugts_version": __version__,
            "files": [{"path": rel, "size": size, "sha256": digest} for rel, (size, digest) in zip(files, results)],
            "meta": dict(meta or {}),
        }
        self.put_bytes(manifest_uri, (json.dumps(manifest, indent=2) + "\n").encode(), "application/json")
        return manifest

    def artifact_complete(self, uri: str) -> bool:
        return self.exists(join_uri(uri, MANIFEST))

    def fetch_artifact(self, uri: str, dest_dir: str | os.PathLike) -> builtins.list[Path]:
        """Download a published artifact, verifying each file's size and sha256 against the
        manifest. ``dest_dir`` gets its own ``_manifest.json`` last, as the local marker."""
        manifest_uri = join_uri(uri, MANIFEST)
        try:
            raw = self.get_bytes(manifest_uri)
        except ObjectNotFound as err:
            if err.code != "NoSuchKey":
                raise
            raise InputError(uri, f"incomplete artifact: no {MANIFEST}") from None
        entries = _parse_manifest(manifest_uri, raw)
        dest = Path(dest_dir)
        with staging_dir(dest, marker=MANIFEST) as stage:

            def fetch(entry: dict[str, Any]) -> None:
                obj = join_uri(uri, entry["path"])
                try:
                    size, digest = self._download(obj, stage / local_relpath(obj, entry["path"]))
                except ObjectNotFound:
                    raise InputError(obj, f"listed in {MANIFEST} but missing from the store") from None
                if size != entry["size"]:
                    raise InputError(obj, f"size mismatch: manifest says {entry['size']} bytes, got {size}")
                if digest != entry["sha256"]:
                    raise InputError(obj, f"sha256 mismatch: manifest says {entry['sha256']}, got {digest}")

            self._parallel(fetch, entries)
            (stage / MANIFEST).write_bytes(raw)
        return [dest / local_relpath(uri, e["path"]) for e in entries]


# --- helpers --------------------------------------------------------------------------


def _sha256_file(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _check_mirrorable(uri: str, rels: list[str]) -> None:
    """S3 may hold an object ``x`` beside objects ``x/y``; a folder cannot. Refuse before
    any download instead of failing half-way with a file-system error."""
    names = set(rels)
    for rel in rels:
        parts = rel.split("/")
        for n in range(1, len(parts)):
            if "/".join(parts[:n]) in names:
                raise InputError(
                    uri,
                    f"holds both an object and a folder of objects named {'/'.join(parts[:n])!r}; "
                    "a local mirror cannot",
                )


def _local_files(local: Path) -> list[str]:
    if not local.is_dir():
        raise InputError(local, "not a directory")
    return sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())


def _parse_manifest(uri: str, raw: bytes) -> list[dict[str, Any]]:
    try:
        manifest = json.loads(raw)
        entries = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not all(
            isinstance(e["path"], str) and isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in entries
        ):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise InputError(uri, f"malformed manifest (expected format {MANIFEST_FORMAT})") from None
    return entries


def localize(uri_or_path: str | os.PathLike, workdir: str | os.PathLike, store: ObjectStore | None = None) -> Path:
    """A local path for an input: local paths come back as they are; ``s3://`` URIs are
    downloaded under ``workdir/<bucket>/<key>`` (one object, e.g. a .zip, or a whole
    prefix such as a DICOM study; a published artifact is fetched and verified)."""
    text = os.fspath(uri_or_path)
    if not is_s3_uri(text):
        if "://" in text:
            raise InputError(text, "unsupported URI scheme (use a local path or s3://bucket/prefix)")
        return Path(text)
    bucket, key = parse_s3_uri(text)
    store = store or ObjectStore()
    dest = Path(workdir) / bucket
    if key.strip("/"):
        dest = dest / local_relpath(text, key.strip("/"))
    if key and not key.endswith("/") and store.exists(text):
        return store.download_file(text, dest)
    if store.artifact_complete(text):
        store.fetch_artifact(text, dest)
    elif not store.download_prefix(text, dest):
        raise InputError(text, "no such object, and no objects under this prefix")
    return dest
