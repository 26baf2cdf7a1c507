"""Procedural abdomen / lower chest: named organs as label maps, tissue classes for rendering.

Two maps come out, on the same grid:
- ``organs`` (uint8): the ground truth, one label per named organ (``labels.ORGANS``);
- ``tissue`` (uint8): what each voxel is made of (``labels.TISSUES``), which drives CT/MR
  intensities. Organs hold several tissues (kidney: cortex, medulla, sinus fat; liver:
  parenchyma, vessels).

Organs (builders in ``body.py`` and ``viscera.py``) are implicit shapes (``shapes.py``)
evaluated on body-frame coordinates that a smooth random warp has displaced, inside bounding
boxes to keep it fast. Positions are tied to a few landmarks (body outline, diaphragm domes,
spine) drawn per seed, so relative anatomy stays right while sizes, positions and shapes vary.
Painting order sets precedence: later organs win.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from diffugts.phantom import body, viscera
from diffugts.phantom.grid import Grid, sinus_warp

WARP_MM = 7.0  # amplitude of the smooth per-seed deformation


@dataclass
class Anatomy:
    organs: np.ndarray  # uint8 labels (ORGANS)
    tissue: np.ndarray  # uint8 tissue classes (TISSUES)
    landmarks: dict  # scalar landmarks (mm, body frame) for the record and for lesion placement
    oral_contrast: bool


class Canvas:
    """Warped coordinates plus the two maps being painted."""

    def __init__(self, grid: Grid, rng: np.random.Generator):
        self.grid = grid
        z, y, x = grid.axes()
        z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
        dz, dy, dx = sinus_warp(rng, WARP_MM)(z, y, x)
        self.Z, self.Y, self.X = z + dz, y + dy, x + dx
        self.organ = np.zeros(grid.shape, np.uint8)
        self.tissue = np.zeros(grid.shape, np.uint8)

    def box(self, lo, hi):
        m = WARP_MM * 1.5 + 4.0
        return self.grid.box(np.asarray(lo) - m, np.asarray(hi) + m)

    def at(self, box):
        return self.Z[box], self.Y[box], self.X[box]

    def paint(self, box, mask, label, tissue, over=None):
        """Set ``label``/``tissue`` where ``mask``; ``over`` limits it to those current labels."""
        org, tis = self.organ[box], self.tissue[box]
        if over is not None:
            mask = mask & np.isin(org, over)
        if label is not None:
            org[mask] = label
        tis[mask] = tissue if np.isscalar(tissue) else tissue[mask]
        return mask


def build_anatomy(grid: Grid, rng: np.random.Generator) -> Anatomy:
    """One patient's anatomy. All randomness comes from ``rng``, in a fixed order."""
    cv = Canvas(grid, rng)
    L = SimpleNamespace()
    body.body_wall(cv, L, rng)
    body.diaphragm(cv, L, rng)
    body.spine_landmarks(L, rng)
    body.back_muscles(cv, L, rng)
    body.chest(cv, L, rng)
    viscera.bowel(cv, L, rng)
    viscera.stomach(cv, L, rng)
    viscera.liver(cv, L, rng)
    viscera.spleen(cv, L, rng)
    viscera.pancreas(cv, L, rng)
    viscera.kidneys(cv, L, rng)
    viscera.great_vessels(cv, L, rng)
    body.spine(cv, L, rng)
    body.ribs(cv, L, rng)
    # The landmarks are real numbers, bools and strings (np.isscalar's stub also admits complex and bytes).
    marks = {
        k: (v if isinstance(v, (bool, str)) else round(float(v), 2))  # type: ignore[arg-type]
        for k, v in vars(L).items()
        if np.isscalar(v)
    }
    return Anatomy(cv.organ, cv.tissue, marks, bool(L.oral_contrast))
