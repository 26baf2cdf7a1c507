"""The region to inpaint: dilating the coarse mask in mm, the paste-back weights,
and its footprint on the model and latent grids.

Everything on the study grid is computed inside the mask's bounding box (plus the dilation),
so large volumes with small lesions stay cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from diffugts.artifacts.geometry import Geometry


@dataclass
class MaskSource:
    """Where the coarse mask came from (recorded in synthesis.json)."""

    kind: str  # "attention", "file" or "array" (in memory)
    path: str
    targets: list[dict]  # attention targets used: index, prompt text, mask file


def spacing_kji(geometry: Geometry) -> tuple[float, float, float]:
    k, j, i = (float(s) for s in geometry.spacing[::-1])
    return k, j, i


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


def make_region(mask: np.ndarray, spacing: tuple[float, float, float], dilation_mm: float, feather_mm: float) -> Region:
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
    return np.asarray(blocks.any(axis=(1, 3, 5)))


def latent_box(footprint: np.ndarray, margin: tuple[int, int, int], multiple: int) -> tuple[slice, ...]:
    """The footprint's bounding box plus ``margin`` latent voxels, each side a multiple of
    ``multiple`` (what the denoiser's downsampling needs), kept inside the latent grid."""
    tight = bbox(footprint)
    if tight is None:
        raise ValueError("latent_box of an empty footprint")
    box = grow(tight, margin, footprint.shape)
    out = []
    for s, n in zip(box, footprint.shape):
        size = min(-(-(s.stop - s.start) // multiple) * multiple, n)
        start = min(s.start, n - size)  # grow past the far end by moving the start back
        out.append(slice(start, start + size))
    return tuple(out)
