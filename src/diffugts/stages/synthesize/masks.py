"""The region to inpaint: loading the coarse mask, dilating it in mm, the paste-back weights,
and its footprint on the model and latent grids.

Everything on the study grid is computed inside the mask's bounding box (plus the dilation),
so large volumes with small lesions stay cheap.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from diffugts.errors import InputError
from diffugts.artifacts.geometry import Geometry

ATTENTION_MARKER = "attention.json"
# NIfTI stores origin / direction in float32: allow that much disagreement with series.json.
GEOMETRY_ATOL_MM = 1e-3


@dataclass
class MaskSource:
    """Where the coarse mask came from (recorded in synthesis.json)."""

    kind: str  # "attention" or "file"
    path: str
    targets: list[dict]  # attention targets used: index, prompt text, mask file


def read_image(path: str | os.PathLike, geometry: Geometry, what: str = "mask") -> np.ndarray:
    """A 3D single-channel NIfTI that must lie exactly on the study grid, as its array (k, j, i)."""
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
        raise InputError(path, f"{what} size {list(found.shape[::-1])} (i, j, k) does not match the study "
                               f"{list(geometry.shape[::-1])}")
    if not found.allclose(geometry, atol=GEOMETRY_ATOL_MM):
        raise InputError(path, f"{what} geometry (origin / spacing / direction) differs from the study grid")
    return sitk.GetArrayFromImage(image)


def read_mask(path: str | os.PathLike, geometry: Geometry) -> np.ndarray:
    """A binary mask NIfTI on the study grid, as bool (k, j, i); anything else is an InputError."""
    array = read_image(path, geometry, "mask")
    if not ((array == 0) | (array == 1)).all():  # cheaper than np.unique on a full CT
        values = np.unique(array)
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise InputError(path, f"mask is not binary (values {shown}; expected 0 and 1)")
    return array.astype(bool)


def mask_from_attention(folder: str | os.PathLike, geometry: Geometry,
                        target: int | None = None) -> tuple[np.ndarray, MaskSource]:
    """The union of the attention artifact's coarse masks, or target ``target`` alone."""
    folder = Path(folder)
    marker = folder / ATTENTION_MARKER
    if not marker.is_file():
        raise InputError(folder, f"not an attention artifact (no {ATTENTION_MARKER}; run `diffugts attend` first)")
    try:
        targets = json.loads(marker.read_text())["targets"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(marker, f"unreadable attention summary ({err})") from None
    if target is not None:
        if not 0 <= target < len(targets):
            raise InputError(marker, f"--target {target}: the artifact has targets 0..{len(targets) - 1}")
        targets = [targets[target]]
    union = np.zeros(geometry.shape, bool)
    used = []
    for t in targets:
        if not isinstance(t, dict) or not t.get("mask"):
            raise InputError(marker, f"attention target without a mask file: {str(t)[:80]}")
        union |= read_mask(folder / t["mask"], geometry)
        used.append({"index": t.get("index"), "prompt": (t.get("prompt") or {}).get("text"), "mask": t["mask"]})
    return union, MaskSource("attention", str(folder), used)


def spacing_kji(geometry: Geometry) -> tuple[float, float, float]:
    return tuple(float(s) for s in geometry.spacing[::-1])


def bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of the true voxels, or None when there are none."""
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        return None
    return tuple(slice(int(a.min()), int(a.max()) + 1) for a in idx)


def grow(box: tuple[slice, ...], pad, shape) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(box, pad, shape))


@dataclass
class Region:
    """The coarse mask, its dilation and the paste-back weights, on the study grid."""

    mask: np.ndarray  # bool, the coarse mask as given
    dilated: np.ndarray  # bool, mask dilated by dilation_mm: the only voxels that may change
    weight: np.ndarray  # float32 in [0, 1], zero outside ``dilated``, one on ``mask``


def make_region(mask: np.ndarray, spacing: tuple[float, float, float], dilation_mm: float,
                feather_mm: float) -> Region:
    """Dilate by ``dilation_mm`` (Euclidean, anisotropic spacing) and build the paste weights.

    Weight = distance to the nearest voxel outside the dilated mask / ``feather_mm``, clipped
    to [0, 1], and 1 on the coarse mask: the output ramps into the input across the outer
    band of the dilated mask and is the input itself outside it.
    """
    dilated = np.zeros(mask.shape, bool)
    weight = np.zeros(mask.shape, np.float32)
    box = bbox(mask)
    if box is None:
        return Region(mask, dilated, weight)
    pad = [int(math.ceil(dilation_mm / s)) + 2 for s in spacing]
    box = grow(box, pad, mask.shape)
    sub = mask[box]
    # A one-voxel frame of "outside" so distances inside are finite at the volume border too.
    inside = np.pad(ndimage.distance_transform_edt(~sub, sampling=spacing) <= dilation_mm, 1)
    depth = ndimage.distance_transform_edt(inside, sampling=spacing)[1:-1, 1:-1, 1:-1]
    inside = inside[1:-1, 1:-1, 1:-1]
    w = np.clip(depth / feather_mm, 0.0, 1.0) if feather_mm > 0 else inside.astype(np.float64)
    w[sub] = 1.0
    w[~inside] = 0.0
    dilated[box] = inside
    weight[box] = w.astype(np.float32)
    return Region(mask, dilated, weight)


def latent_footprint(model_mask: np.ndarray, stride: int) -> np.ndarray:
    """Latent voxels that touch any masked model voxel (max-pool by ``stride``)."""
    k, j, i = (n // stride for n in model_mask.shape)
    blocks = model_mask[: k * stride, : j * stride, : i * stride].reshape(k, stride, j, stride, i, stride)
    return blocks.any(axis=(1, 3, 5))


def latent_box(footprint: np.ndarray, margin: tuple[int, int, int], multiple: int) -> tuple[slice, ...]:
    """The footprint's bounding box plus ``margin`` latent voxels, each side a multiple of
    ``multiple`` (what the denoiser's downsampling needs), kept inside the latent grid."""
    box = grow(bbox(footprint), margin, footprint.shape)
    out = []
    for s, n in zip(box, footprint.shape):
        size = min(-(-(s.stop - s.start) // multiple) * multiple, n)
        start = min(s.start, n - size)  # grow past the far end by moving the start back
        out.append(slice(start, start + size))
    return tuple(out)
