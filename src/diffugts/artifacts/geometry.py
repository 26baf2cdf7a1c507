"""Voxel grids in DICOM patient coordinates (LPS, millimetres), as SimpleITK sees them.

Arrays are indexed ``[k, j, i]`` (slice, row, column), like ``sitk.GetArrayFromImage``.
``direction`` holds the unit axis vectors of i, j and k as its columns, so the world
position of voxel (i, j, k) is ``origin + direction @ (spacing * (i, j, k))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True, init=False)
class Geometry:
    origin: np.ndarray  # (3,) world position of voxel (0, 0, 0)
    spacing: np.ndarray  # (3,) mm along i, j, k
    direction: np.ndarray  # (3, 3) columns: unit vectors of i, j, k
    shape: tuple[int, int, int]  # (nk, nj, ni), the numpy array shape

    def __init__(self, origin: ArrayLike, spacing: ArrayLike, direction: ArrayLike, shape: Sequence[int]):
        # Any sequence in, float64 arrays and an int tuple kept (frozen: set once, here).
        object.__setattr__(self, "origin", np.asarray(origin, dtype=np.float64).reshape(3))
        object.__setattr__(self, "spacing", np.asarray(spacing, dtype=np.float64).reshape(3))
        object.__setattr__(self, "direction", np.asarray(direction, dtype=np.float64).reshape(3, 3))
        k, j, i = (int(n) for n in shape)
        object.__setattr__(self, "shape", (k, j, i))

    @property
    def matrix(self) -> np.ndarray:
        """3x3 map from index (i, j, k) to a world offset: direction scaled by spacing."""
        return self.direction * self.spacing[None, :]

    @property
    def affine(self) -> np.ndarray:
        """4x4 index (i, j, k, 1) -> LPS world (x, y, z, 1)."""
        out = np.eye(4)
        out[:3, :3] = self.matrix
        out[:3, 3] = self.origin
        return out

    def world(self, ijk) -> np.ndarray:
        """World coordinates of index points, shape (..., 3) in (i, j, k) order."""
        return np.asarray(ijk, dtype=np.float64) @ self.matrix.T + self.origin

    def to_sitk(self, image) -> None:
        """Stamp this geometry on a SimpleITK image built from an array of ``shape``."""
        image.SetOrigin(tuple(self.origin))
        image.SetSpacing(tuple(self.spacing))
        image.SetDirection(tuple(self.direction.reshape(-1)))

    @classmethod
    def from_sitk(cls, image) -> Geometry:
        size = image.GetSize()
        return cls(
            origin=image.GetOrigin(),
            spacing=image.GetSpacing(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
            shape=(size[2], size[1], size[0]),
        )

    def as_dict(self) -> dict:
        return {
            "shape_kji": list(self.shape),
            "size_ijk": list(self.shape[::-1]),
            "origin_lps_mm": [round(float(v), 6) for v in self.origin],
            "spacing_mm": [round(float(v), 6) for v in self.spacing],
            "direction": [[round(float(v), 9) for v in row] for row in self.direction],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(d["origin_lps_mm"], d["spacing_mm"], d["direction"], d["shape_kji"])

    def crop(self, box) -> Geometry:
        """The sub-grid of the (k, j, i) slices ``box`` (with start and stop): same spacing and
        direction, origin at the box's first voxel."""
        start = [s.start for s in box][::-1]  # (i, j, k)
        return Geometry(self.world(start), self.spacing, self.direction, tuple(s.stop - s.start for s in box))

    def allclose(self, other: Geometry, atol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


def orientation_label(normal: np.ndarray) -> str:
    """Axial / Coronal / Sagittal by the dominant axis of the slice normal."""
    return ("Sagittal", "Coronal", "Axial")[int(np.argmax(np.abs(normal)))]


def obliquity_deg(direction: np.ndarray) -> float:
    """Largest angle between an axis of the grid and the nearest patient axis."""
    cosines = np.abs(np.asarray(direction)).max(axis=0).clip(-1.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def nearest_axis_frame(direction: np.ndarray) -> np.ndarray:
    """The signed permutation matrix closest to ``direction`` (columns matched to axes)."""
    from itertools import permutations

    best: tuple[int, ...] = (0, 1, 2)
    best_score = -np.inf
    for perm in permutations(range(3)):
        score = sum(abs(direction[perm[c], c]) for c in range(3))
        if score > best_score:
            best, best_score = perm, score
    frame = np.zeros((3, 3))
    for c in range(3):
        frame[best[c], c] = 1.0 if direction[best[c], c] >= 0 else -1.0
    return frame
