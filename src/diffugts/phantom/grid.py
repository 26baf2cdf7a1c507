"""The voxel grid, its patient geometry, and the smooth random fields the generator uses.

Conventions (used everywhere in the phantom package):
- arrays are indexed ``[k, j, i]`` = ``[z, y, x]`` (what SimpleITK's ``GetArrayFromImage`` gives);
- ``spacing`` and ``origin`` are ``(x, y, z)`` in mm, DICOM/ITK order;
- patient coordinates are DICOM LPS: +x = patient's left, +y = posterior, +z = superior; the
  direction matrix is the identity (axial slices, rows run anterior -> posterior, columns run
  patient right -> left, slices in increasing z), so ``origin`` is the first slice's
  ImagePositionPatient.
- anatomy is modelled in a *body frame* in mm whose axes are the LPS axes and whose origin is
  the centre of the field of view; ``Grid.offset`` maps it to patient coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]  # (nz, ny, nx)
    spacing: tuple[float, float, float]  # (dx, dy, dz) mm
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # body frame -> LPS (x, y, z) mm

    @property
    def origin(self) -> tuple[float, float, float]:
        """LPS position of voxel [0, 0, 0] (= ImagePositionPatient of the first slice)."""
        x, y, z = (float(o - (n - 1) / 2 * s) for o, n, s in zip(self.offset, self.shape[::-1], self.spacing))
        return x, y, z

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """1-D body-frame coordinates (z, y, x) in mm, float32."""
        nz, ny, nx = self.shape
        dx, dy, dz = self.spacing
        z, y, x = (
            ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).astype(np.float32)
            for n, s in ((nz, dz), (ny, dy), (nx, dx))
        )
        return z, y, x

    def box(self, lo_mm, hi_mm) -> tuple[slice, slice, slice]:
        """Index box (z, y, x slices) covering the body-frame mm range [lo, hi] (x, y, z)."""
        out = []
        for ax, (lo, hi) in zip((2, 1, 0), zip(lo_mm, hi_mm)):
            n, s = self.shape[ax], self.spacing[2 - ax]
            a = int(np.floor(lo / s + (n - 1) / 2))
            b = int(np.ceil(hi / s + (n - 1) / 2)) + 1
            out.append(slice(max(a, 0), min(max(b, 0), n)))
        x, y, z = out  # built along x, y, z
        return z, y, x

    def to_patient(self, kji) -> np.ndarray:
        """Voxel index (k, j, i), possibly fractional, -> LPS (x, y, z) mm."""
        kji = np.asarray(kji, dtype=np.float64)
        return np.asarray(self.origin) + kji[::-1] * np.asarray(self.spacing)


def smooth_noise(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """Gaussian random field with unit standard deviation (float32).

    ``sigma_vox`` may be a scalar or per-axis (z, y, x). Normalised by the theoretical
    standard deviation of filtered white noise so small boxes are not over-stretched.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (3,))
    field = ndimage.gaussian_filter(white, sig, mode="wrap", truncate=3.0)
    # std of white noise filtered by a normalised Gaussian: prod_d (2 sqrt(pi) sigma_d)^-1/2
    norm = np.prod([1.0 / np.sqrt(2 * np.sqrt(np.pi) * max(s, 0.3)) for s in sig])
    return field / np.float32(norm)


def sinus_warp(rng: np.random.Generator, amplitude_mm: float, wavelength_mm=(180.0, 320.0)):
    """A smooth random displacement field as a sum of separable sine products.

    Returns a function ``(z, y, x) -> (dz, dy, dx)`` on broadcastable 1-D/3-D coordinates.
    Separable terms keep it to a few multiplications per voxel (no per-voxel trig).
    """
    terms = []
    for _ in range(3):  # output component
        comp = []
        for _ in range(2):  # two terms per component
            lo, hi = wavelength_mm
            w = rng.uniform(lo, hi, size=3)
            ph = rng.uniform(0, 2 * np.pi, size=3)
            a = rng.normal(0, amplitude_mm / 2)
            comp.append((a, 2 * np.pi / w, ph))
        terms.append(comp)

    def warp(z, y, x):
        out = []
        for comp in terms:
            acc = None
            for a, k, ph in comp:
                t = (
                    np.float32(a)
                    * np.sin(k[0] * z + ph[0]).astype(np.float32)
                    * np.sin(k[1] * y + ph[1]).astype(np.float32)
                    * np.sin(k[2] * x + ph[2]).astype(np.float32)
                )
                acc = t if acc is None else acc + t
            out.append(acc)
        return out  # dz, dy, dx

    return warp
