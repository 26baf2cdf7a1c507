"""What every artifact reader and writer shares: a marker file read as JSON, images that must
lie on the study grid, and NIfTI writing. Each artifact's own module names its files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from diffugts.artifacts.geometry import Geometry
from diffugts.errors import InputError

# NIfTI stores origin / direction in float32: allow that much disagreement with series.json.
GEOMETRY_ATOL_MM = 1e-3


def read_marker(root: str | os.PathLike, marker: str, what: str, hint: str = "") -> dict:
    """``root/marker`` as JSON; a missing or unreadable marker is bad input naming the folder
    (``what``: "an attention" ...; ``hint``: how such an artifact is made)."""
    root = Path(root)
    path = root / marker
    if not path.is_file():
        raise InputError(root, f"not {what} artifact (no {marker}{'; ' + hint if hint else ''})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable ({' '.join(str(err).split())[:100]})") from None
    if not isinstance(data, dict):
        raise InputError(path, "unreadable (not a JSON object)")
    return data


def read_on_grid(path: str | os.PathLike, geometry: Geometry, what: str = "image", dtype=None) -> np.ndarray:
    """A 3D single-channel NIfTI that must lie on ``geometry``, as its (k, j, i) array."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(path, f"unreadable {what} ({' '.join(str(err).split())[:100]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError(path, f"{what} must be a 3D single-channel image")
    found = Geometry.from_sitk(image)
    if found.shape != geometry.shape:
        raise InputError(
            path,
            f"{what} size {list(found.shape[::-1])} (i, j, k) does not match the study {list(geometry.shape[::-1])}",
        )
    if not found.allclose(geometry, atol=GEOMETRY_ATOL_MM):
        raise InputError(path, f"{what} geometry (origin / spacing / direction) differs from the study grid")
    array = sitk.GetArrayFromImage(image)
    return array if dtype is None else array.astype(dtype, copy=False)


def read_binary(path: str | os.PathLike, geometry: Geometry, what: str = "mask") -> np.ndarray:
    """A binary NIfTI on the study grid as bool; any value but 0 and 1 is bad input."""
    array = read_on_grid(path, geometry, what)
    if not ((array == 0) | (array == 1)).all():  # cheaper than np.unique on a full CT
        values = np.unique(array)
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise InputError(path, f"{what} is not binary (values {shown}; expected 0 and 1)")
    return array.astype(bool)


def write_image(path: Path, array: np.ndarray, geometry: Geometry, compress: bool = True) -> None:
    """A NIfTI image on ``geometry`` (SimpleITK handles LPS -> RAS)."""
    image = sitk.GetImageFromArray(array)
    geometry.to_sitk(image)
    sitk.WriteImage(image, str(path), useCompression=compress)


def check_schema(summary: dict, marker_path: Path, version: int) -> None:
    """Artifacts carry ``schema_version``; one newer than this code reads is bad input
    (artifacts written before versioning have none and are version 1)."""
    found = summary.get("schema_version", 1)
    if not isinstance(found, int) or found > version:
        raise InputError(marker_path, f"schema_version {found!r} is newer than this diffugts reads ({version})")


def slug(text: str) -> str:
    """File-name part for a prompt (attention maps and lesion masks use the same)."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"
