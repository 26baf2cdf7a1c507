"""Atomic artifact writing: nothing half-written ever looks complete.

Single files are written to a temporary sibling and renamed into place (``os.replace``
is atomic on POSIX). Multi-file artifacts are assembled in a staging directory and
declared complete by writing their marker file (a manifest or ``series.json``) last.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays show up in summaries; keep json.dumps strict otherwise.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike, marker: str | None = None) -> Iterator[Path]:
    """A scratch directory beside ``final`` whose contents are moved into it on success.

    ``marker`` names the file that declares the artifact complete: an old one in
    ``final`` is removed before anything moves, and the new one moves in last. ``final``
    may already exist (KFP creates output artifact paths); entries the staging directory
    also holds are replaced. On failure the staging directory is removed and ``final``
    keeps whatever it had before.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield stage
        final.mkdir(parents=True, exist_ok=True)
        if marker:
            with contextlib.suppress(FileNotFoundError):
                (final / marker).unlink()
        entries = sorted(stage.iterdir(), key=lambda e: (e.name == marker, e.name))
        for entry in entries:
            target = final / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale_partials(final: str | os.PathLike) -> None:
    """Remove staging directories of ``final`` left by a killed run (SIGKILL skips the
    ``finally`` of :func:`staging_dir`). Only for callers that own ``final`` exclusively:
    a concurrent writer's staging directory would go too."""
    final = Path(final)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse an output path that is not valid UTF-8: SimpleITK aborts the whole process
    (exit 134, no message) on one."""
    from diffugts.errors import OutputError

    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise OutputError(path, "the path is not valid UTF-8; choose another output folder") from None


def reserve(path: str | os.PathLike, size: int) -> None:
    """Claim ``size`` bytes for ``path`` before a library that reports a full disk badly
    (SimpleITK: a generic RuntimeError) writes it: a full disk or quota fails here with
    its errno."""
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
                raise
