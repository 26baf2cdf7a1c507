"""From the study grid to the model grid and back.

The model sees volumes on its own grid: the package's voxel spacing and orientation
(MAISI: RAS arrays at the training spacing), padded to a multiple of the network's total
stride, with intensities scaled to [0, 1] (CT: an HU window, clipped; MR: percentiles, as
MAISI's MR transform). :class:`ModelSpace` remembers both grids, so maps computed on the
model grid go back onto the exact study grid (the source DICOM series' geometry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from diffugts.geometry import Geometry

ORIENTATIONS = {"LPS": np.eye(3), "RAS": np.diag([-1.0, -1.0, 1.0])}


@dataclass(frozen=True)
class Preprocessing:
    spacing_mm: tuple[float, float, float]
    orientation: str = "LPS"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    mr_percentiles: tuple[float, float] = (0.0, 99.5)
    multiple: int = 16

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(tuple(d["spacing_mm"]), d.get("orientation", "LPS"), tuple(d.get("ct_window", (-1000, 1000))),
                   tuple(d.get("mr_percentiles", (0.0, 99.5))), int(d.get("multiple", 16)))


@dataclass(frozen=True)
class ModelSpace:
    study: Geometry
    model: Geometry

    def to_study(self, array: np.ndarray, fill: float = 0.0, nearest: bool = False) -> np.ndarray:
        """A map on the model grid resampled onto the study grid (trilinear, or nearest for labels)."""
        return resample_array(array, self.model, self.study, fill, nearest)

    def to_model(self, array: np.ndarray, fill: float = 0.0, nearest: bool = False) -> np.ndarray:
        return resample_array(array, self.study, self.model, fill, nearest)


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


def to_model(volume: np.ndarray, geometry: Geometry, modality: str, prep: Preprocessing) -> tuple[np.ndarray, ModelSpace]:
    """Normalised volume on the model grid, and the space to map results back."""
    space = ModelSpace(geometry, model_grid(geometry, prep))
    x = normalise(volume, modality, prep)
    fill = 0.0  # air (CT) / background (MR) after normalisation
    return space.to_model(x, fill=fill).astype(np.float32), space


def resample_array(array: np.ndarray, src: Geometry, dst: Geometry, fill: float = 0.0,
                   nearest: bool = False) -> np.ndarray:
    if src.allclose(dst, atol=1e-6):
        return array.astype(np.float32, copy=True) if not nearest else array.copy()
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
