"""Locations: a local path or an ``s3://`` URI behind the same few calls.

For code that keeps its records and results "wherever the user pointed it" (the cohort
runner: ``results_uri`` may be a local folder or an S3 prefix). Each call picks the local
file system or the object store (a fresh :class:`ObjectStore`, settings from the
environment, its retries) by the URI alone:

- :func:`join`: a child location;
- :func:`read_bytes`: the bytes of a file or object, None when there is none;
- :func:`read_json`: a JSON object, None when absent, unreadable or not an object;
- :func:`write_json`: write a JSON object atomically (a local temporary file renamed into place;
  one S3 PUT);
- :func:`publish`: copy a finished local folder under a location, marker last (locally the
  given marker file, on S3 the store's ``_manifest.json``);
- :func:`list_children`: the direct children of a folder or prefix, one level only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffugts.errors import InputError
from diffugts.utils import atomic

log = logging.getLogger("diffugts.storage")


def is_s3(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` names the object store (``s3://...``) rather than a local path."""
    return str(uri).startswith("s3://")


def _store():
    from diffugts.storage.store import ObjectStore

    return ObjectStore()


def join(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended: an S3 URI (:func:`~diffugts.storage.uri.join_uri`) or a
    local path."""
    if is_s3(base):
        from diffugts.storage.uri import join_uri

        return join_uri(base, *parts)
    return str(Path(base, *parts))


def read_bytes(uri: str) -> bytes | None:
    """The content of the file or object at ``uri``, or None when there is none."""
    if is_s3(uri):
        from diffugts.storage.errors import ObjectNotFound

        try:
            return _store().get_bytes(uri)
        except ObjectNotFound:
            return None
    path = Path(uri)
    return path.read_bytes() if path.is_file() else None


def read_json(uri: str) -> dict | None:
    """The JSON object at ``uri``, or None when absent or unreadable (logged as a warning): one
    corrupt record must not sink its reader, it counts as absent."""
    raw = read_bytes(uri)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        log.warning("%s: not a JSON document; taken as absent", uri)
        return None
    return doc if isinstance(doc, dict) else None


def write_json(uri: str, obj: dict) -> None:
    """Write ``obj`` as indented JSON (one trailing newline) to ``uri``, atomically: readers see
    the old document or the new one, never part of one."""
    if is_s3(uri):
        _store().put_bytes(uri, (json.dumps(obj, indent=2) + "\n").encode(), "application/json")
    else:
        atomic.write_json(uri, obj)


def publish(local_dir: str | os.PathLike, uri: str, marker: str, meta: Mapping[str, Any] | None = None) -> str:
    """Copy the finished folder ``local_dir`` to ``uri``, declared complete last: on S3 by the
    store's manifest (:meth:`~diffugts.storage.store.ObjectStore.publish_dir`, ``meta`` in it),
    locally by ``marker`` (:func:`~diffugts.utils.atomic.staging_dir`: the old marker goes
    first, the new one moves in last). Returns where it went."""
    if is_s3(uri):
        _store().publish_dir(local_dir, uri, meta=meta)
        return uri
    with atomic.staging_dir(uri, marker=marker) as stage:
        shutil.copytree(local_dir, stage, dirs_exist_ok=True)
    return str(Path(uri))


@dataclass(frozen=True)
class Child:
    """A direct child of a folder or prefix: its ``name`` (no trailing ``/``) and its ``uri``."""

    name: str
    uri: str
    folder: bool | None = None  # known from an S3 listing; None: asked of the file system when needed

    @property
    def is_dir(self) -> bool:
        """A sub-folder (locally: a folder or a link to one) or a sub-prefix."""
        return Path(self.uri).is_dir() if self.folder is None else self.folder


def list_children(uri: str) -> list[Child]:
    """The entries directly under the folder or prefix ``uri``, sorted by name; one level only
    (on S3 one delimiter listing with the store's retries, not every key below). A local
    ``uri`` that is not a folder is an :class:`InputError`; an S3 prefix with nothing under it
    has no children."""
    if is_s3(uri):
        from diffugts.storage.uri import folder_prefix, parse_s3_uri

        bucket, key = parse_s3_uri(uri)
        base = folder_prefix(key)
        children = []
        for entry in _store().list_entries(uri):
            name = entry.key[len(base) :].rstrip("/")
            if name:  # not the folder marker of the prefix itself
                children.append(Child(name, f"s3://{bucket}/{entry.key.rstrip('/')}", entry.is_dir))
        return sorted(children, key=lambda c: c.name)
    root = Path(uri)
    if not root.is_dir():
        raise InputError(uri, "no such folder")
    return [Child(p.name, str(p)) for p in sorted(root.iterdir())]
