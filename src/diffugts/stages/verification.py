"""Lesion verification: the last step of residual refinement, one decision per candidate lesion.

The refinement head decides voxel by voxel. Whether a candidate lesion is a lesion at all is a
question about the whole candidate: how large it is, how sure the head is across it, how far it
departs from its organ and from the pseudo-healthy image. A verifier with one weight per such
piece of evidence (a logistic regression, fitted on held-out training cases by ``diffugts train
verifier``) keeps or drops each candidate; a package without one keeps every component of the
head's mask, as before (docs/method.md, "lesion verification").

The candidates (the verifier's ``candidate_source``) are the connected components of either
- ``refined``: the head's mask at its threshold (verifiers fitted before 2026-12-04), or
- ``deviation``: the organ-relative deviation |z| > ``deviation_k``, opened. The deviation
  finds lesions of types no head was trained on; the head's map then counts as evidence
  about each candidate instead of deciding which voxels are candidates at all;
- ``normative``: the normative model's candidates (diffugts.stages.normative): tissue unlike
  the healthy tissue of its organ, which the organ's own vessels and sinus are not.

The evidence maps of one target, on one grid:
- ``refined``: the head's probability; ``coarse``: the fused coarse map;
- ``deviation``: |z| of the organ-relative deviation (diffugts.stages.deviation);
- ``residual``: |x - H| in model intensity units (the input against its pseudo-healthy image);
- ``organ``: the target's organ (with inclusions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from diffugts.stages.lesions import CONNECTIVITY_26

# Component features, in the order of the verifier's weights.
FEATURES = (
    "log_volume_ml",
    "refined_mean",
    "refined_max",
    "coarse_mean",
    "deviation_mean",
    "residual_mean",
    "organ_fraction",
)
CANDIDATE_SOURCES = ("refined", "deviation", "normative")


@dataclass(frozen=True)
class Evidence:
    """One target's evidence maps on one grid (see the module docstring)."""

    refined: np.ndarray
    coarse: np.ndarray
    deviation: np.ndarray
    residual: np.ndarray
    organ: np.ndarray


@dataclass(frozen=True)
class LesionVerifier:
    """Standardised features -> logistic score; components scoring below ``threshold`` are
    dropped. ``mean``/``scale`` standardise the features as at fitting time."""

    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    threshold: float
    features: tuple[str, ...] = FEATURES
    candidate_source: str = "refined"  # the default: how verifiers fitted before the choice decided
    deviation_k: float = 2.0  # the |z| of a "deviation" candidate

    @classmethod
    def from_dict(cls, d: dict) -> LesionVerifier:
        d = dict(d)
        if tuple(d.get("features", FEATURES)) != FEATURES:
            raise ValueError(f"unknown lesion verifier features {d.get('features')!r}")
        if d.get("candidate_source", "refined") not in CANDIDATE_SOURCES:
            raise ValueError(f"unknown lesion verifier candidate source {d.get('candidate_source')!r}")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N,) probability that each component is a lesion."""
        z = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.weights) + self.bias)))


def verifier_of(pkg) -> LesionVerifier | None:
    """The package's lesion verifier (``networks.refine.verifier``), or None."""
    entry = (pkg.network("refine") or {}).get("verifier")
    return LesionVerifier.from_dict(entry) if entry else None


def deviation_candidates(deviation: np.ndarray, k: float) -> np.ndarray:
    """Candidate lesion voxels from the organ-relative deviation: |z| > ``k``, opened so that
    single voxels and one-voxel bridges of noise do not make or merge candidates."""
    return ndimage.binary_opening(np.abs(np.asarray(deviation)) > k)


def candidates(
    mask: np.ndarray, evidence: Evidence, voxel_ml: float, min_volume_ml: float = 0.0
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """The mask's 26-connected components: (labels, ids of those of at least ``min_volume_ml``,
    their (N, F) features in the order of FEATURES)."""
    labels, n = ndimage.label(np.asarray(mask, bool), structure=CONNECTIVITY_26)
    if n == 0:
        return labels, [], np.zeros((0, len(FEATURES)))
    index = np.arange(1, n + 1)
    count = ndimage.sum_labels(np.ones(labels.shape, np.float32), labels, index)
    ids = [int(i) for i, c in zip(index, count) if c * voxel_ml >= min_volume_ml]
    if not ids:
        return labels, [], np.zeros((0, len(FEATURES)))

    def mean(a):
        return ndimage.mean(np.asarray(a, np.float32), labels, ids)

    count = np.asarray([count[i - 1] for i in ids])
    feats = np.stack(
        [
            np.log10(count * voxel_ml),
            mean(evidence.refined),
            ndimage.maximum(np.asarray(evidence.refined, np.float32), labels, ids),
            mean(evidence.coarse),
            mean(evidence.deviation),
            mean(evidence.residual),
            mean(evidence.organ),
        ],
        1,
    )
    return labels, ids, feats


def verified(mask: np.ndarray, evidence: Evidence, verifier: LesionVerifier | None, voxel_ml: float) -> np.ndarray:
    """``mask`` without the components the verifier rejects (all kept without a verifier)."""
    mask = np.asarray(mask, bool)
    if verifier is None or not mask.any():
        return mask
    labels, ids, feats = candidates(mask, evidence, voxel_ml)
    keep = [i for i, s in zip(ids, verifier.scores(feats)) if s >= verifier.threshold]
    return np.isin(labels, keep) & mask
