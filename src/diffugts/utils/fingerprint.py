"""Content fingerprints of a study input and of a model package, for pipeline cache keys.

KFP's cache key is built from a task's input values (and the names of its input artifacts), not
from what a URI points to. A study re-exported under the same folder, or a model replaced under
the same prefix, would be served from the cache. So the pipelines compute these fingerprints in
an uncached step and pass them to every cached task that reads the study or the model.

- model: the sha256 of its ``manifest.json``, which lists the sha256 of every weight file
  (:func:`diffugts.runners.cohort.model_sha256`, the model identity the cohort markers use too);
- study: sha256 over the sorted (relative name, content digest, size) of its files. Local files
  are read and hashed; S3 objects contribute their ETag (the store's content checksum; for a
  multipart upload a checksum of the part checksums, which still changes with the content)
  so a fingerprint costs one listing, not a download.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from diffugts.errors import InputError

_CHUNK = 1 << 20


def _digest(entries: list[tuple[str, str | None, int | None]]) -> str:
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def study_sha256(input_uri: str) -> str:
    """Fingerprint of a study input: a DICOM folder, a ``.zip``, or an ``s3://`` prefix or object."""
    if str(input_uri).startswith("s3://"):
        return _s3_digest(str(input_uri))
    path = Path(input_uri)
    if path.is_file():
        return _digest([(path.name, _file_sha256(path), path.stat().st_size)])
    if not path.is_dir():
        raise InputError(input_uri, "no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _digest([(p.relative_to(path).as_posix(), _file_sha256(p), p.stat().st_size) for p in files])


def _s3_digest(uri: str) -> str:
    from diffugts.storage import ObjectStore
    from diffugts.storage.uri import folder_prefix, parse_s3_uri

    _, key = parse_s3_uri(uri)
    store = ObjectStore()
    if key.lower().endswith(".zip"):
        stat = store.stat(uri)
        return _digest([(key.rsplit("/", 1)[-1], stat.etag, stat.size)])
    prefix = folder_prefix(key)
    objs = store.list_entries(uri, recursive=True)
    entries = [(o.key[len(prefix) :], o.etag, o.size) for o in objs if not o.key.endswith("/")]
    if not entries:
        raise InputError(uri, "no objects under this prefix")
    return _digest(entries)


def model_sha256(model_uri: str) -> str:
    from diffugts.runners.cohort import model_sha256 as manifest_sha256

    return manifest_sha256(model_uri)
