"""Generic synthetic anomalies for training the AOVA head and the normative model's anomaly
discriminator (:func:`organ_relative_anomaly`, diffugts.stages.discriminator).

The head sees few real lesions (a seen-type case carries one or two), and learns their
particular looks rather than "unlike the tissue around it". Self-supervised anomaly
detection answers this with synthetic anomalies (DRAEM, CutPaste, foreign-patch
interpolation); we paint generic ones into training cases on the model grid, before the
frozen backbone sees them:

- a blob: an ellipsoid, its surface perturbed by smooth noise, 6-50 mm across, inside a
  *seen* organ (liver, kidneys: the zero-shot protocol keeps pancreas and spleen unseen);
- a shift of the organ's own intensity by +-15..80 HU (either sign: no one lesion type),
  with smooth texture and a soft edge of random width, so the local noise stays the organ's.

Nothing here is a lesion type of the phantom library (no rim, no necrotic core, no
multiplicity rule): the head learns deviation as such. The painted blob joins the case's
lesion map like a real lesion, with generic prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from scipy import ndimage

from diffugts.phantom.grid import smooth_noise
from diffugts.phantom.shapes import ellipsoid, ramp, rotation
from diffugts.phantom.split import SEEN_ORGANS
from diffugts.stages.preprocess import Preprocessing, intensity_range
from diffugts.train.aova import organ_family
from diffugts.train.data import TrainingCase

PROMPTS = ("{organ} lesion", "{organ} tumor", "abnormal {organ} tissue")


@dataclass(frozen=True)
class AnomalySpec:
    """Ranges a synthetic anomaly is drawn from (decisions; see the module docstring)."""

    count: tuple[int, int] = (1, 3)  # per case
    diameter_mm: tuple[float, float] = (6.0, 50.0)
    contrast_hu: tuple[float, float] = (15.0, 80.0)  # magnitude; the sign is random
    texture_hu: tuple[float, float] = (0.0, 15.0)
    edge_mm: tuple[float, float] = (0.5, 4.0)
    lobulation: tuple[float, float] = (0.0, 0.35)


def add_anomalies(
    case: TrainingCase, prep: Preprocessing, rng: np.random.Generator, spec: AnomalySpec = AnomalySpec()
) -> TrainingCase:
    """A copy of ``case`` (on ``prep``'s model grid) with generic anomalies painted into its
    seen organs (CT only)."""
    if case.modality != "CT":
        raise ValueError("synthetic anomalies are painted in CT training cases only")
    hosts = [
        (label, name)
        for label, name in case.organ_names.items()
        if name in SEEN_ORGANS and (case.organs == label).any()
    ]
    x, lesions, records = case.x.copy(), case.lesions.copy(), list(case.records)
    if not hosts:
        return replace(case, x=x, lesions=lesions, records=records)
    sp = np.asarray(prep.spacing_mm, dtype=np.float64)[::-1]  # (z, y, x) mm
    lo, hi = intensity_range(x, "CT", prep)  # the image is (HU - lo) / (hi - lo)
    next_id = int(lesions.max()) + 1
    for _ in range(int(rng.integers(spec.count[0], spec.count[1] + 1))):
        label, name = hosts[int(rng.integers(len(hosts)))]
        organ = (case.organs == label) & (lesions == 0)
        mask, weight = _blob(organ, sp, rng, spec)
        if mask is None:
            continue
        sign = 1.0 if rng.random() < 0.5 else -1.0
        shift = sign * rng.uniform(*spec.contrast_hu)
        texture = rng.uniform(*spec.texture_hu) * smooth_noise(rng, x.shape, 1.5 / sp)
        x += weight * ((shift + texture) / (hi - lo)).astype(np.float32)
        lesions[mask] = next_id
        records.append(_record(next_id, name, "seen", mask))
        next_id += 1
    return replace(case, x=np.clip(x, 0.0, 1.0), lesions=lesions, records=records)


def _record(lesion_id: int, organ: str, split: str, mask: np.ndarray) -> dict:
    """A painted anomaly's lesion record, as case.json holds a lesion's, with generic prompts."""
    fam = organ_family(organ)
    return {
        "id": lesion_id,
        "type": "synthetic",
        "organ": organ,
        "split": split,
        "prompts": [p.format(organ=fam) for p in PROMPTS],
        "voxels": int(mask.sum()),
    }


class BlobShape(Protocol):
    """The geometric ranges a blob is drawn from; both specs (AnomalySpec for the AOVA head,
    RelativeAnomalySpec for the discriminator) have them, and differ in how they shift intensity."""

    @property
    def diameter_mm(self) -> tuple[float, float]: ...
    @property
    def edge_mm(self) -> tuple[float, float]: ...
    @property
    def lobulation(self) -> tuple[float, float]: ...


def _blob(organ: np.ndarray, sp: np.ndarray, rng, spec: BlobShape):
    """(mask, soft weight) of one blob centred in ``organ``, or (None, None) if none fits."""
    dist = ndimage.distance_transform_edt(organ, sampling=sp)
    r = float(np.exp(rng.uniform(*np.log(spec.diameter_mm)))) / 2
    r = min(r, float(dist.max()) * 1.2)
    cand = np.flatnonzero(dist.ravel() >= min(0.6 * r, dist.max() * 0.9))
    if r < 2.0 or not len(cand):
        return None, None
    c = np.array(np.unravel_index(cand[int(rng.integers(len(cand)))], organ.shape))
    Z, Y, X = np.meshgrid(*[(np.arange(n) - ci) * d for n, ci, d in zip(organ.shape, c, sp)], indexing="ij")
    q = ellipsoid(
        Z.astype(np.float32),
        Y.astype(np.float32),
        X.astype(np.float32),
        (0, 0, 0),
        r * rng.uniform(0.7, 1.3, 3),
        rotation(*rng.uniform(0, 180, 3)),
    )
    lob = rng.uniform(*spec.lobulation)
    if lob > 0:
        q = q / np.maximum(1 + np.float32(lob) * smooth_noise(rng, q.shape, rng.uniform(4, 12) / sp), 0.3)
    mask = (q < 1) & organ
    if mask.sum() < 4:
        return None, None
    weight = ramp((q - 1.0) * r, rng.uniform(*spec.edge_mm)) * organ
    weight[mask] = np.maximum(weight[mask], 0.5)
    return mask, weight.astype(np.float32)


@dataclass(frozen=True)
class RelativeAnomalySpec:
    """Ranges of the anomalies the normative model's discriminator learns from
    (diffugts.stages.discriminator): the intensity shift and texture in units of the organ's
    robust spread, so that one spec serves every organ, CT and MR."""

    count: tuple[int, int] = (1, 2)  # per painted copy
    diameter_mm: tuple[float, float] = (5.0, 40.0)
    contrast: tuple[float, float] = (0.7, 6.0)  # magnitude (organ spreads); the sign is random
    texture: tuple[float, float] = (0.0, 1.0)  # amplitude of smooth texture (organ spreads)
    edge_mm: tuple[float, float] = (0.5, 4.0)
    lobulation: tuple[float, float] = (0.0, 0.35)


def organ_spread(x: np.ndarray, organ: np.ndarray, inner: np.ndarray, spacing_kji, floor: float) -> float:
    """The organ's robust spread in ``x`` as the normative model measures it (its 2.5 mm local
    mean over ``organ``, read in ``inner``; at least ``floor``): the unit of
    :func:`organ_relative_anomaly`'s shifts."""
    from diffugts.stages.deviation import local_mean, robust_centre
    from diffugts.stages.normative import MEAN_SCALES_MM

    return robust_centre(local_mean(x, organ, MEAN_SCALES_MM[1], spacing_kji)[inner], floor)[1]


def organ_relative_anomaly(
    x: np.ndarray,
    organ: np.ndarray,
    spread: float,
    spacing_kji,
    rng: np.random.Generator,
    spec: RelativeAnomalySpec = RelativeAnomalySpec(),
    clip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(a copy of ``x`` with ``spec.count`` blobs painted inside ``organ``, their voxels (bool)).
    The blobs come from the same generator as the AOVA head's (:func:`_blob`); their shift is
    a random multiple of ``spread`` (the organ's robust spread in ``x``'s units), clipped to
    [0, 1] as the model grid's intensities are (``clip=False``: intensities in other units)."""
    sp = np.asarray(spacing_kji, dtype=np.float64)
    out, painted = np.array(x, np.float32, copy=True), np.zeros(np.shape(x), bool)
    for _ in range(int(rng.integers(spec.count[0], spec.count[1] + 1))):
        mask, weight = _blob(np.asarray(organ, bool) & ~painted, sp, rng, spec)
        if mask is None:
            continue
        shift = (1.0 if rng.random() < 0.5 else -1.0) * rng.uniform(*spec.contrast) * spread
        texture = rng.uniform(*spec.texture) * spread * smooth_noise(rng, out.shape, 1.5 / sp)
        out += (weight * (shift + texture)).astype(np.float32)
        painted |= mask
    return (np.clip(out, 0.0, 1.0) if clip else out), painted


def with_relative_anomalies(
    case: TrainingCase,
    prep: Preprocessing,
    rng: np.random.Generator,
    chance: float = 0.6,
    spec: RelativeAnomalySpec = RelativeAnomalySpec(),
    margin_mm: float = 5.0,
    floor: float = 0.02,
) -> TrainingCase:
    """A copy of ``case`` (CT or MR, with its ``volume``) with generic anomalies
    (:func:`organ_relative_anomaly`) painted into each host organ with probability ``chance``,
    every organ and both modalities alike: the lesion verifier's type-free lesions (one
    lesion id and record per painted organ). They are painted into the volume in its own
    units, against the spread of the organ's 2.5 mm local mean inside its interior (as the
    normative model measures it), and ``x`` is normalised from the painted volume, so that
    synthesis and every evidence map see the same anomaly. ``floor``: the least spread, in
    model intensity units."""
    from diffugts.stages.deviation import DeviationParams, organ_interior
    from diffugts.stages.preprocess import normalise
    from diffugts.train.refine import HOST_FAMILIES

    if case.volume is None:
        raise ValueError(f"{case.case_id}: generic anomalies are painted into the volume; keep it")
    sp = np.asarray(prep.spacing_mm, dtype=np.float64)[::-1]  # (k, j, i) mm
    lo, hi = intensity_range(case.volume, case.modality, prep)
    volume, lesions, records = np.array(case.volume, np.float32), case.lesions.copy(), list(case.records)
    next_id = int(lesions.max()) + 1
    for label, name in sorted(case.organ_names.items()):
        fam = organ_family(name)
        organ = (case.organs == label) & (lesions == 0)
        if fam not in HOST_FAMILIES or rng.random() >= chance:
            continue
        inner = organ_interior(organ, sp, DeviationParams(margin_mm=margin_mm))
        if inner.sum() < 10:
            continue
        spread = organ_spread(volume, organ, inner, sp, floor * (hi - lo))
        volume, painted = organ_relative_anomaly(volume, organ, spread, sp, rng, spec, clip=False)
        if not painted.any():
            continue
        lesions[painted] = next_id
        records.append(_record(next_id, name, "synthetic", painted))
        next_id += 1
    return replace(case, x=normalise(volume, case.modality, prep), volume=volume, lesions=lesions, records=records)
