"""Where DICOM comes from: a folder, a single file, a .zip archive, or an s3:// prefix.

Everything is made local first (zip extracted with guards, S3 mirrored) so the header
scan can defer pixel data and re-open files by name.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from diffugts.errors import InputError

# A zip that expands beyond this is refused before extraction (zip bombs).
MAX_ZIP_BYTES = int(float(os.environ.get("DIFFUGTS_MAX_ZIP_GB", "64")) * 2**30)


@dataclass(frozen=True)
class SourceFile:
    path: Path  # local path to read
    name: str  # how reports refer to it: relative to the input


def localize(input_ref: str | os.PathLike, workdir: Path) -> Path:
    """A local path for a folder, file, zip or s3:// URI (S3 is mirrored into workdir)."""
    ref = os.fspath(input_ref)
    if ref.startswith("s3://"):
        from diffugts import storage  # minio is only needed for S3 inputs

        return storage.localize(ref, workdir / "s3")
    path = Path(ref)
    if not path.exists():
        raise InputError(ref, "no such file or folder")
    return path


def list_files(input_ref: str | os.PathLike, workdir: Path) -> list[SourceFile]:
    """All candidate files under the input, in a stable order, named relative to it."""
    local = localize(input_ref, workdir)
    if local.is_file() and zipfile.is_zipfile(local):
        local = _extract_zip(local, workdir / "zip")
    if local.is_file():
        return [SourceFile(local, local.name)]
    files = sorted(p for p in local.rglob("*") if p.is_file() and not p.is_symlink())
    return [SourceFile(p, str(p.relative_to(local))) for p in files]


def _extract_zip(archive: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            total = sum(m.file_size for m in members)
            if total > MAX_ZIP_BYTES:
                raise InputError(archive, f"zip expands to {total / 2**30:.1f} GiB, above the "
                                          f"{MAX_ZIP_BYTES / 2**30:.0f} GiB limit (DIFFUGTS_MAX_ZIP_GB)")
            dest.mkdir(parents=True, exist_ok=True)
            root = dest.resolve()
            for m in members:
                target = (dest / m.filename).resolve()
                # Zip-slip guard: never write outside the extraction folder.
                if root not in target.parents:
                    raise InputError(archive, f"unsafe member path {m.filename!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise InputError(archive, f"cannot read zip archive ({err})") from None
    return dest
