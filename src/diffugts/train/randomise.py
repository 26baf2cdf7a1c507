"""Intensity domain randomisation for training the heads (modality-robust grounding).

The frozen backbone and the heads see CT in training; MR, and any other contrast, puts the
same tissues at other intensities (MAISI-style percentile scaling puts fat near 0.85 and a T2
liver near 0.2, where CT has 0.25 and 0.55). A head that learned "liver is mid-grey" cannot
find an MR liver. Following SynthSeg-style randomisation, each training copy gives every
tissue label a random intensity, keeps the case's own texture, noise and lesions as a
residual around the tissue means (scaled by a random gain of either sign), and adds a random
gamma and a smooth multiplicative bias field. Organ and lesion labels are unchanged, so the
head must ground organs by shape and context, not by grey level.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from diffugts.phantom.grid import smooth_noise
from diffugts.train.data import TrainingCase


@dataclass(frozen=True)
class RandomiseSpec:
    """Ranges each copy is drawn from (decisions, docs/method.md)."""

    tissue: tuple[float, float] = (0.05, 0.95)  # each label's new mean, model units
    background: tuple[float, float] = (0.0, 0.12)  # label 0 (air outside the body)
    gain: tuple[float, float] = (0.6, 1.6)  # residual (texture, noise, lesions) scale; sign random
    gamma_log: float = 0.4  # gamma = exp(U(-g, g))
    bias: float = 0.2  # bias field amplitude (fraction)
    bias_sigma_mm: float = 60.0
    psf_vox: float = 0.6  # blur of the new tissue means (partial volume at label borders)


def randomise(
    case: TrainingCase, rng: np.random.Generator, spacing_kji, spec: RandomiseSpec = RandomiseSpec()
) -> TrainingCase:
    """A copy of ``case`` whose intensities follow random per-tissue look-up tables."""
    labels = case.organs.astype(np.int64)
    count = int(labels.max()) + 1
    healthy = case.lesions == 0
    means = np.zeros(count, np.float32)
    for label in range(count):
        sel = (labels == label) & healthy
        if sel.any():
            means[label] = np.median(case.x[sel])
    residual = case.x - means[labels]
    lut = rng.uniform(*spec.tissue, size=count).astype(np.float32)
    lut[0] = rng.uniform(*spec.background)
    base = ndimage.gaussian_filter(lut[labels], spec.psf_vox)
    gain = rng.uniform(*spec.gain) * (1.0 if rng.random() < 0.5 else -1.0)
    y = np.clip(base + gain * residual, 0.0, 1.0) ** np.float32(np.exp(rng.uniform(-spec.gamma_log, spec.gamma_log)))
    field = smooth_noise(rng, y.shape, spec.bias_sigma_mm / np.asarray(spacing_kji, float))
    y = y * (1.0 + spec.bias * np.clip(field, -2.5, 2.5) / 2.5)
    return replace(case, case_id=f"{case.case_id}-randomised", x=np.clip(y, 0.0, 1.0).astype(np.float32), volume=None)
