"""Organ-relative deviation: how far each voxel departs from the tissue it lies in.

A lesion is tissue that looks unlike the rest of its organ. That needs no lesion labels and
holds for lesion types, organs and modalities no head was trained on, so the coarse stage
fuses it with the learned anomaly branch (docs/method.md, "organ-relative deviation"):

1. the target's organ comes from the AOVA region map, made to *hold its lesions*: a lesion
   rarely looks like its organ, so the raw region map has holes and notches exactly where
   the lesions are; closing, hole filling (3D, then slice by slice) and dropping small
   fragments give the organ with its inclusions;
2. inside it, a local mean of the intensities (a Gaussian normalised convolution restricted to
   the organ, so fat or air next to it do not leak in) is compared with the organ's robust
   statistics (median and MAD): the signed robust z-score of each voxel;
3. optionally only in the organ's *interior* (``margin_mm`` in from its surface): an organ
   map from a network is wrong mostly at its border, where fat, air or the next organ then
   look like a lesion; the border is left unscored (z = 0 there).

Everything runs on the model grid in numpy/scipy; the parameters are recorded in the model
package (``networks.aova.deviation``) so a package reproduces its own maps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its SD
GAUSS_TRUNCATE = 4.0  # scipy's gaussian_filter default: its kernels reach this many sigmas


@dataclass(frozen=True)
class DeviationParams:
    """Decisions, each kept a parameter (defaults chosen on development seeds, docs/method.md)."""

    sigma_mm: float = 2.5  # local mean scale: averages noise, keeps small lesions
    close_mm: float = 6.0  # closing radius that pulls notches (lesions at the organ's edge) into the organ
    min_fraction: float = 0.15  # fragments smaller than this share of the largest are dropped
    floor: float = 0.02  # the least robust SD, in model intensity units (a flat organ is not infinitely sure)
    # Unscored border of the organ (mm). 0, the default, is how packages fitted before the
    # margin existed were made, so they reproduce their own maps; recipes set it explicitly.
    margin_mm: float = 0.0

    @classmethod
    def from_dict(cls, d: dict | None) -> DeviationParams:
        return cls(**(d or {}))

    def as_dict(self) -> dict:
        return asdict(self)


def organ_with_inclusions(
    region: np.ndarray, spacing_kji, params: DeviationParams = DeviationParams(), claimed: np.ndarray | None = None
) -> np.ndarray:
    """The organ mask from a binary region map, lesions (holes, edge notches) included, except
    ``claimed`` voxels (another class of the organ network holds them: the vena cava, a vessel,
    the next organ; diffugts.networks.organs)."""
    region = np.asarray(region, bool)
    if not region.any():
        return region
    radius = np.maximum(np.rint(params.close_mm / np.asarray(spacing_kji, float)), 1).astype(int)
    box = organ_box(region, spacing_kji, params.close_mm)
    out = np.zeros(region.shape, bool)
    out[box] = _with_inclusions(region[box], radius, params)
    return out & ~claimed if claimed is not None else out


def organ_from_log_odds(log_odds: np.ndarray, spacing_kji, params: DeviationParams = DeviationParams()) -> np.ndarray:
    """:func:`organ_with_inclusions` of a region's log-odds (> 0), without the voxels they mark
    claimed (-inf, diffugts.networks.organs.CLAIMED)."""
    log_odds = np.asarray(log_odds)
    return organ_with_inclusions(log_odds > 0, spacing_kji, params, np.isneginf(log_odds))


def _with_inclusions(region: np.ndarray, radius: np.ndarray, params: DeviationParams) -> np.ndarray:
    ball = _ellipsoid(radius)
    pad = [(int(r), int(r)) for r in radius]
    closed = ndimage.binary_closing(np.pad(region, pad), structure=ball)
    closed = closed[tuple(slice(r, r + n) for r, n in zip(radius, region.shape))] | region
    filled = ndimage.binary_fill_holes(closed)
    for k in range(filled.shape[0]):  # a lesion open to one end of the organ is a hole in its slices
        filled[k] = ndimage.binary_fill_holes(filled[k])
    labels, n = ndimage.label(filled)
    if n > 1:
        sizes = ndimage.sum(filled, labels, range(1, n + 1))
        keep = np.flatnonzero(sizes >= params.min_fraction * sizes.max()) + 1
        filled = np.isin(labels, keep)
    return filled


def organ_interior(
    organ: np.ndarray, spacing_kji, params: DeviationParams = DeviationParams(), min_share: float = 0.0
) -> np.ndarray:
    """The voxels of ``organ`` at least ``params.margin_mm`` in from its surface (all of it for
    margin 0). An organ too thin to have an interior keeps its voxels rather than vanish.
    ``min_share``: while the interior would hold less than this share of the organ, the margin
    is halved, down to one voxel (a fixed margin leaves a thin organ, a pancreas, mostly
    unscored; docs/benchmarks.md, "A thin organ's border")."""
    organ = np.asarray(organ, bool)
    if params.margin_mm <= 0 or not organ.any():
        return organ
    spacing = np.asarray(spacing_kji, float)
    box = organ_box(organ, spacing_kji, params.margin_mm)
    margin = params.margin_mm
    radius = np.maximum(np.rint(margin / spacing), 1).astype(int)
    inner = np.zeros(organ.shape, bool)
    inner[box] = _eroded(organ[box], radius)
    while inner.sum() < min_share * organ.sum() and (radius > 1).any():  # one voxel is the least
        margin /= 2
        radius = np.maximum(np.rint(margin / spacing), 1).astype(int)
        inner[box] = _eroded(organ[box], radius)
    return inner if inner.sum() >= 10 else organ


def _eroded(organ: np.ndarray, radius: np.ndarray) -> np.ndarray:
    # Pad with the organ itself (not background): the volume's edge is not the organ's surface.
    pad = [(int(r), int(r)) for r in radius]
    inner = ndimage.binary_erosion(np.pad(organ, pad, mode="edge"), structure=_ellipsoid(radius))
    return inner[tuple(slice(r, r + n) for r, n in zip(radius, organ.shape))]


def deviation_z(
    x: np.ndarray, organ: np.ndarray, spacing_kji, params: DeviationParams = DeviationParams()
) -> np.ndarray:
    """Signed robust z-score of the organ-restricted local mean of ``x`` (0 outside the organ's
    interior, :func:`organ_interior`)."""
    return _robust_z(x, organ_interior(organ, spacing_kji, params), spacing_kji, params)


def _robust_z(x: np.ndarray, scored: np.ndarray, spacing_kji, params: DeviationParams) -> np.ndarray:
    """:func:`deviation_z` inside the already-made interior ``scored``."""
    z = np.zeros(x.shape, np.float32)
    if scored.sum() < 10:
        return z
    box = organ_box(scored, spacing_kji, GAUSS_TRUNCATE * params.sigma_mm)
    local = local_mean(x[box], scored[box], params.sigma_mm, spacing_kji)[scored[box]]
    median, spread = robust_centre(local, params.floor)
    z[scored] = (local - median) / spread
    return z


def organ_box(mask: np.ndarray, spacing_kji, reach_mm: float) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``reach_mm`` (at least one voxel) on every side,
    within the volume. Why: the organ-restricted filters of this module and of the normative
    features reach no further than that from the organ, so running them on the box gives the
    same numbers, bit for bit, as on the whole volume, at a fraction of the cost (a kidney
    fills ~1 % of an abdominal CT)."""
    spacing = np.asarray(spacing_kji, float)
    pad = np.ceil(reach_mm / spacing).astype(int) + 1
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    spans = [np.flatnonzero(np.any(mask, axis=tuple(b for b in range(mask.ndim) if b != a))) for a in range(mask.ndim)]
    return tuple(slice(max(int(s[0]) - p, 0), min(int(s[-1]) + p + 1, n)) for s, p, n in zip(spans, pad, mask.shape))


def local_mean(x: np.ndarray, mask: np.ndarray, sigma_mm: float, spacing_kji) -> np.ndarray:
    """A Gaussian local mean of ``x`` over ``mask`` only (a normalised convolution: fat or air
    next to the organ do not leak in)."""
    sigma = sigma_mm / np.asarray(spacing_kji, float)
    w = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    return ndimage.gaussian_filter(np.where(mask, x, 0).astype(np.float32), sigma) / np.maximum(w, 1e-3)


def robust_centre(values: np.ndarray, floor: float) -> tuple[float, float]:
    """(median, MAD as a normal SD, at least ``floor``) of ``values``."""
    median = float(np.median(values))
    return median, max(float(np.median(np.abs(values - median))) * MAD_TO_SD, floor)


def _ellipsoid(radius) -> np.ndarray:
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grids, radius)) <= 1.0


@dataclass(frozen=True)
class Fusion:
    """The coarse map: the organ (region map with inclusions) times
    ``sigmoid(anomaly_weight * anomaly log-odds + deviation_weight * |z| + bias)``.

    The three numbers are fitted after the AOVA head (logistic regression on seen training
    voxels inside their organs, :func:`diffugts.train.fusion.fit_fusion`), so the learned
    branch and the label-free deviation each count as much as they earn.
    """

    anomaly_weight: float
    deviation_weight: float
    bias: float
    deviation: DeviationParams = DeviationParams()

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        return cls(
            float(d["anomaly_weight"]),
            float(d["deviation_weight"]),
            float(d["bias"]),
            DeviationParams.from_dict(d.get("deviation")),
        )

    def as_dict(self) -> dict:
        return {
            "anomaly_weight": self.anomaly_weight,
            "deviation_weight": self.deviation_weight,
            "bias": self.bias,
            "deviation": self.deviation.as_dict(),
        }

    def maps(self, x: np.ndarray, region_log_odds: np.ndarray, anomaly_log_odds: np.ndarray, spacing_kji) -> FusedMaps:
        """One target's maps on the model grid."""
        organ, scored, z = organ_deviation(x, region_log_odds, spacing_kji, self.deviation)
        logit = self.anomaly_weight * anomaly_log_odds + self.deviation_weight * np.abs(z) + self.bias
        prob = np.where(scored, 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30))), 0.0).astype(np.float32)
        return FusedMaps(prob, organ, z)


def organ_deviation(
    x: np.ndarray, region_log_odds: np.ndarray, spacing_kji, params: DeviationParams = DeviationParams()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One target's organ with its inclusions, its scored interior (:func:`organ_interior`, the
    whole organ for margin 0) and its signed deviation z, from the head's region log-odds
    (every head has them; the fusion adds the anomaly branch on top)."""
    organ = organ_from_log_odds(region_log_odds, spacing_kji, params)
    scored = organ_interior(organ, spacing_kji, params)
    return organ, scored, _robust_z(x, scored, spacing_kji, params)


@dataclass
class FusedMaps:
    prob: np.ndarray  # P(lesion of the target), 0 outside its organ's scored interior
    organ: np.ndarray  # the organ with its inclusions (bool)
    z: np.ndarray  # signed organ-relative deviation (0 outside the organ)
