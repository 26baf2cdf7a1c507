"""From the study grid to the model grid and back.

The model sees volumes on its own grid: the package's voxel spacing and orientation
(MAISI: RAS arrays at the training spacing), padded to a multiple of the network's total
stride, with intensities scaled to [0, 1] (CT: an HU window, clipped; MR: percentiles, as
MAISI's MR transform). :class:`ModelSpace` remembers both grids, so maps computed on the
model grid go back onto the exact study grid (the source DICOM series' geometry).

Resampling runs in SimpleITK on the host, or, given a CUDA device (``Backbone.resample_device``),
with torch on that device: at 512x512x128 the host resampling between the grids was 1.1 s of
a 2.8 s study on an H100 (docs/benchmarks.md). Both follow ITK's rules (linear with the edge
voxels repeated up to half a voxel outside, the fill value beyond; nearest rounds half up) and
agree to float precision (tests/test_text_and_preprocess.py); a label voxel can differ where
rounding puts a position on the other side of an exact half-voxel tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from diffugts.artifacts.geometry import Geometry

ORIENTATIONS = {"LPS": np.eye(3), "RAS": np.diag([-1.0, -1.0, 1.0])}


@dataclass(frozen=True)
class Preprocessing:
    spacing_mm: tuple[float, float, float]
    orientation: str = "LPS"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    mr_percentiles: tuple[float, float] = (0.0, 99.5)
    multiple: int = 16

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            tuple(d["spacing_mm"]),
            d.get("orientation", "LPS"),
            tuple(d.get("ct_window", (-1000, 1000))),
            tuple(d.get("mr_percentiles", (0.0, 99.5))),
            int(d.get("multiple", 16)),
        )


@dataclass(frozen=True)
class ModelSpace:
    study: Geometry
    model: Geometry
    device: object = None  # a torch device to resample on (None: SimpleITK on the host)

    def to_study(self, array: np.ndarray, fill: float = 0.0, nearest: bool = False, box=None) -> np.ndarray:
        """A map on the model grid resampled onto the study grid (trilinear, or nearest for
        labels); only the study voxels of ``box`` ((k, j, i) slices) when given: the same
        values as ``to_study(array)[box]``, without resampling the rest."""
        dst = self.study if box is None else self.study.crop(box)
        return resample_array(array, self.model, dst, fill, nearest, self.device)

    def to_model(self, array: np.ndarray, fill: float = 0.0, nearest: bool = False) -> np.ndarray:
        return resample_array(array, self.study, self.model, fill, nearest, self.device)


def model_grid(study: Geometry, prep: Preprocessing) -> Geometry:
    """The model-orientation grid at the model spacing that covers the study, padded."""
    direction = ORIENTATIONS[prep.orientation]
    spacing = np.asarray(prep.spacing_mm, dtype=np.float64)
    k, j, i = study.shape
    corners = np.array([[a, b, c] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5) for c in (-0.5, k - 0.5)])
    along = study.world(corners) @ direction  # corner coordinates along the model axes
    lo, hi = along.min(axis=0), along.max(axis=0)
    size = np.maximum(np.round((hi - lo) / spacing - 1e-6).astype(int), 1)
    size = ((size + prep.multiple - 1) // prep.multiple) * prep.multiple
    centre = (lo + hi) / 2
    first = centre - (size - 1) / 2 * spacing  # centre the padded grid on the study
    return Geometry(direction @ first, spacing, direction, (size[2], size[1], size[0]))


def intensity_range(volume: np.ndarray, modality: str, prep: Preprocessing) -> tuple[float, float]:
    """The (lo, hi) that :func:`normalise` maps to (0, 1): the CT window, or MR percentiles."""
    if modality == "CT":
        return float(prep.ct_window[0]), float(prep.ct_window[1])
    lo, hi = np.percentile(volume, prep.mr_percentiles)
    return float(lo), float(lo) + max(float(hi - lo), 1e-6)


def normalise(volume: np.ndarray, modality: str, prep: Preprocessing) -> np.ndarray:
    """Intensities to the model's [0, 1] range (clipped for CT, as MAISI's transforms)."""
    v = volume.astype(np.float32, copy=False)
    lo, hi = intensity_range(v, modality, prep)
    out = (v - lo) / (hi - lo)
    return (np.clip(out, 0.0, 1.0) if modality == "CT" else out).astype(np.float32)


def to_model(
    volume: np.ndarray, geometry: Geometry, modality: str, prep: Preprocessing, device=None
) -> tuple[np.ndarray, ModelSpace]:
    """Normalised volume on the model grid, and the space to map results back (resampling on
    ``device`` when given, see :func:`resample_array`)."""
    space = ModelSpace(geometry, model_grid(geometry, prep), device)
    x = normalise(volume, modality, prep)
    fill = 0.0  # air (CT) / background (MR) after normalisation
    return space.to_model(x, fill=fill).astype(np.float32), space


def resample_array(
    array: np.ndarray, src: Geometry, dst: Geometry, fill: float = 0.0, nearest: bool = False, device=None
) -> np.ndarray:
    """``array`` on the ``src`` grid resampled onto ``dst`` (float32): trilinear, or nearest
    for labels; ``fill`` outside. ``device``: with torch there (:func:`resample_torch`)."""
    if src.allclose(dst, atol=1e-6):
        return array.astype(np.float32, copy=True) if not nearest else array.copy()
    if device is not None:
        return resample_torch(array, src, dst, fill, nearest, device)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    src.to_sitk(image)
    out = sitk.Resample(
        image,
        [int(n) for n in dst.shape[::-1]],
        sitk.Transform(),
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
        tuple(dst.origin),
        tuple(dst.spacing),
        tuple(dst.direction.reshape(-1)),
        float(fill),
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)


def resample_torch(
    array: np.ndarray,
    src: Geometry,
    dst: Geometry,
    fill: float = 0.0,
    nearest: bool = False,
    device="cpu",
    slab: int = 32,
) -> np.ndarray:
    """:func:`resample_array` with torch on ``device``, in slabs of ``slab`` output slices.

    Not MONAI's ``SpatialResample``: its zero / border padding differs from ITK's at the
    outer half voxel and its nearest mode rounds half to even, and the two paths must give
    the same masks. Source positions are computed in float64 (as ITK does), so exact
    half-voxel ties round the same way in both, up to floating-point rounding.
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    vol = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(dev)
    sizes = np.asarray(src.shape[::-1], dtype=np.float64)  # (ni, nj, nk) of the source
    # dst index (i, j, k) -> dst world -> src continuous index, composed as ITK does it.
    to_src = np.linalg.inv(src.matrix) @ dst.matrix
    shift = np.linalg.inv(src.matrix) @ (dst.origin - src.origin)
    m = torch.as_tensor(to_src, dtype=torch.float64, device=dev)
    b = torch.as_tensor(shift, dtype=torch.float64, device=dev)
    n = torch.as_tensor(sizes, dtype=torch.float64, device=dev)
    nk, nj, ni = dst.shape
    jj, ii = torch.meshgrid(
        torch.arange(nj, dtype=torch.float64, device=dev),
        torch.arange(ni, dtype=torch.float64, device=dev),
        indexing="ij",
    )
    out = torch.empty((nk, nj, ni), dtype=torch.float32, device=dev)
    for k0 in range(0, nk, slab):
        kk = torch.arange(k0, min(k0 + slab, nk), dtype=torch.float64, device=dev)
        idx = torch.stack(torch.broadcast_tensors(ii[None], jj[None], kk[:, None, None]), -1)  # (s, nj, ni, 3)
        pos = idx @ m.T + b  # continuous (i, j, k) in the source
        inside = ((pos >= -0.5) & (pos < n - 0.5)).all(-1)
        if nearest:
            r = torch.floor(pos + 0.5).long().clamp_min(0)
            r = torch.minimum(r, (n - 1).long())
            part = vol[r[..., 2], r[..., 1], r[..., 0]]
        else:
            # align_corners=True: -1 / +1 are the centres of the first / last voxel; "border"
            # repeats the edge voxels, as ITK's linear interpolator does within half a voxel.
            grid = torch.where(n > 1, 2 * pos / (n - 1).clamp_min(1) - 1, torch.zeros_like(pos))
            part = F.grid_sample(
                vol[None, None], grid[None].float(), mode="bilinear", padding_mode="border", align_corners=True
            )[0, 0]
        out[k0 : k0 + part.shape[0]] = torch.where(inside, part, torch.full_like(part, float(fill)))
    return out.cpu().numpy()
