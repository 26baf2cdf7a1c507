"""Where DICOM comes from: a folder, a single file, a .zip archive, or an s3:// prefix.

Everything is made local first (zip extracted with guards, S3 mirrored) so the header
scan can defer pixel data and re-open files by name.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from diffugts.errors import InputError

# Zip bombs: a zip that expands beyond DIFFUGTS_MAX_ZIP_GB in all, or holds a member larger
# than ZIP_RATIO_FLOOR compressed more than DIFFUGTS_MAX_ZIP_RATIO times, is refused before
# anything is extracted. DICOM deflates 2-10x (CT noise, MR background); deflate tops out near
# 1000x, which only long runs of one byte reach.
ZIP_RATIO_FLOOR = 1 << 20


def max_zip_bytes() -> int:
    return int(float(os.environ.get("DIFFUGTS_MAX_ZIP_GB", "16")) * 2**30)


def max_zip_ratio() -> float:
    return float(os.environ.get("DIFFUGTS_MAX_ZIP_RATIO", "100"))


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
            _check_expansion(archive, members)
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
    except RuntimeError as err:  # zipfile's word for an encrypted member
        raise InputError(archive, f"cannot read zip archive (encrypted: {_one_line(err)})") from None
    except NotImplementedError as err:  # e.g. Deflate64 or another compression method
        raise InputError(archive, f"cannot read zip archive (unsupported: {_one_line(err)})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError) as err:
        raise InputError(archive, f"cannot read zip archive (corrupt: {_one_line(err)})") from None
    except OSError as err:
        raise InputError(archive, f"cannot read zip archive ({err.strerror or _one_line(err)})") from None
    return dest


def _check_expansion(archive: Path, members: list[zipfile.ZipInfo]) -> None:
    """Refuse a zip bomb from its directory, before any byte is inflated (zipfile stops a
    member at its declared size, so the declared sizes bound the real ones)."""
    limit, ratio = max_zip_bytes(), max_zip_ratio()
    total = sum(m.file_size for m in members)
    if total > limit:
        raise InputError(
            archive,
            f"zip expands to {total / 2**30:.3g} GiB, above the {limit / 2**30:g} GiB limit (DIFFUGTS_MAX_ZIP_GB)",
        )
    for m in members:
        if ratio > 0 and m.file_size > ZIP_RATIO_FLOOR and m.file_size > ratio * max(m.compress_size, 1):
            raise InputError(
                archive,
                f"a member's compression ratio is {m.file_size / max(m.compress_size, 1):.0f}:1, "
                f"above the {ratio:g}:1 limit (DIFFUGTS_MAX_ZIP_RATIO): a zip bomb?",
            )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__
