"""Delineation of verified lesions by their level: where the image passes from lesion to organ.

A normative candidate grows through every voxel past its organ's healthy 95 % quantile, and the
coarser appearance features make a ring of tissue next to a lesion look unusual. So a verified
candidate holds its lesion and a halo: on development seeds only 36-55 % of a found lesion's
candidate was lesion. Cutting the candidate on the same score (``NormativeParams.delineate_above``)
splits candidates over several foci and keeps parts that miss the lesion.

The image itself says where a lesion ends. Per verified candidate:
- the lesion's level: the median of the (1 mm smoothed) image over the candidate's core, its
  voxels scoring above ``CORE_LEVEL`` (as ``core_ml``; else its seeds, else all of it);
- the organ's level: the median over the organ's voxels near the candidate (``PAD_MM``), outside
  the candidate grown by two voxels, so a bias field or contrast phase is read where it acts;
- the lesion: the voxels on the lesion's side of ``level`` of the way from the organ's level to
  the lesion's (0.5: half way, the edge of a blurred step), within ``expand_mm`` of the candidate
  and in the organ or the candidate, connected to the core.
Bright and dark lesions alike; no lesion type's look is learnt.

One reported lesion per verified candidate, as before: when the delineation splits a candidate
into several parts of at least the reported minimum volume, or leaves none, the candidate is
reported whole. Delineation changes where, never whether (docs/benchmarks.md, "Delineation by
level").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from diffugts.config import DEFAULT_MIN_VOLUME_ML
from diffugts.stages.lesions import CONNECTIVITY_26
from diffugts.stages.verification import CORE_LEVEL

SMOOTH_MM = 1.0  # the image's noise, not its edges
PAD_MM = 20.0  # how far around a candidate its organ's level is read
MIN_REFERENCE = 20  # voxels: fewer near the candidate, and the whole organ's level is used
CONTINUATION_MM = 10.0  # how far past a candidate tissue like it is followed (within PAD_MM)
CONTINUATION_BAND = 0.5  # "like": within this share of the lesion-organ contrast of its level
SURROUND_MM = (1.5, 4.5)  # ``surround``'s ring around a candidate (mm from it)


@dataclass(frozen=True)
class LevelDelineation:
    """How verified candidates of one target are delineated (NormativeParams.delineate_level):
    ``image`` the model-grid image they were cut from."""

    image: np.ndarray
    level: float
    expand_mm: float

    def __call__(self, kept: np.ndarray, organ: np.ndarray, score: np.ndarray, spacing_mm) -> np.ndarray:
        return level_delineated(kept, self.image, organ, score, spacing_mm, self.level, self.expand_mm)


def level_delineated(
    kept: np.ndarray,
    image: np.ndarray,
    organ: np.ndarray,
    score: np.ndarray,
    spacing_mm,
    level: float = 0.4,
    expand_mm: float = 3.0,
) -> np.ndarray:
    """Each 26-connected component of ``kept`` (verified candidates) delineated by its level
    (module docstring); all on one grid of voxel spacing ``spacing_mm`` (k, j, i); ``score``:
    the relative normative score (diffugts.stages.normative.relative_score)."""
    kept = np.asarray(kept, bool)
    labels, n = ndimage.label(kept, structure=CONNECTIVITY_26)
    if n == 0:
        return kept.copy()
    spacing = np.asarray(spacing_mm, np.float64)
    smooth, organ, fallback = _prepared(image, organ, kept, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = np.zeros(kept.shape, bool)
    for i, tight in enumerate(ndimage.find_objects(labels), start=1):
        box = _padded(tight, spacing, kept.shape)
        candidate = labels[box] == i
        out[box] |= _delineated_one(
            candidate, smooth[box], organ[box], np.asarray(score)[box], spacing, fallback, level, expand_mm, voxel_ml
        )
    return out


def _levels(candidate, smooth, organ, score, fallback):
    """(organ level or None, lesion level, core) of one candidate in its padded box: the
    organ's median near it (outside it grown by two voxels; ``fallback`` where too little organ
    lies near), the median over its core (voxels above CORE_LEVEL; else its seeds; else all)."""
    reference = organ & ~ndimage.binary_dilation(candidate, iterations=2)
    organ_level = float(np.median(smooth[reference])) if reference.sum() >= MIN_REFERENCE else fallback
    core = candidate & (score > CORE_LEVEL)
    if not core.any():
        core = candidate & (score > 0.0)
    if not core.any():
        core = candidate
    return organ_level, float(np.median(smooth[core])), core


def continuation(
    labels: np.ndarray, ids: list[int], image: np.ndarray, organ: np.ndarray, score: np.ndarray, spacing_mm
) -> np.ndarray:
    """Per candidate (component ``i`` of ``labels`` for each of ``ids``) how far tissue like it
    continues past it: log(V' / V), V its volume, V' that of the tissue within
    ``CONTINUATION_MM`` of it, connected to it, whose (smoothed) image lies within
    ``CONTINUATION_BAND`` of the lesion-organ contrast of its level (the levels as
    :func:`level_delineated` reads them, except that where too little organ lies near a
    candidate the organ's level is read away from every candidate, not only the verified ones).
    A lesion ends where it ends: organ tissue surrounds it, and the tissue like its core is the
    lesion itself (about 0). A vessel's crossing, the organ's sinus or the next organ scored as
    this one is part of a larger structure of the same look, which the candidate only samples.
    0 where the image cannot say (no organ to compare with, no contrast). Not learnt from any
    lesion type's look (docs/method.md, "Lesion verification")."""
    out = np.zeros(len(ids))
    for n, candidate, like, distance in _like_tissue(labels, ids, image, organ, score, spacing_mm):
        parts, _ = ndimage.label((like & (distance <= CONTINUATION_MM)) | candidate, structure=CONNECTIVITY_26)
        reached = np.isin(parts, np.unique(parts[candidate]))
        out[n] = np.log(reached.sum() / candidate.sum())
    return out


def surround(
    labels: np.ndarray, ids: list[int], image: np.ndarray, organ: np.ndarray, score: np.ndarray, spacing_mm
) -> np.ndarray:
    """Per candidate the share of the tissue around it (``SURROUND_MM`` from it: the first ring
    of voxels on the demo's grid) that is like it, as :func:`continuation` reads "like". A
    lesion is surrounded by its organ (about 0); a candidate on a vessel, the sinus or the next
    organ lies along tissue of its own look, whether or not that tissue goes on far. 0 where the
    image cannot say."""
    out = np.zeros(len(ids))
    for n, _, like, distance in _like_tissue(labels, ids, image, organ, score, spacing_mm):
        ring = (distance > SURROUND_MM[0]) & (distance <= SURROUND_MM[1])
        out[n] = like[ring].mean() if ring.any() else 0.0
    return out


def _like_tissue(labels, ids, image, organ, score, spacing_mm):
    """Per candidate the image can speak for: (its index in ``ids``, the candidate in its padded
    box, the tissue there like it, each voxel's distance (mm) from it)."""
    labels = np.asarray(labels)
    spacing = np.asarray(spacing_mm, np.float64)
    smooth, organ, fallback = _prepared(image, organ, labels > 0, spacing)
    boxes = ndimage.find_objects(labels)
    for n, i in enumerate(ids):
        box = _padded(boxes[i - 1], spacing, labels.shape)
        candidate = labels[box] == i
        organ_level, lesion_level, _ = _levels(candidate, smooth[box], organ[box], np.asarray(score)[box], fallback)
        if organ_level is None or lesion_level == organ_level:
            continue
        like = np.abs(smooth[box] - lesion_level) < CONTINUATION_BAND * abs(lesion_level - organ_level)
        yield n, candidate, like, ndimage.distance_transform_edt(~candidate, sampling=spacing)


def _prepared(image, organ, candidates, spacing):
    """(the smoothed image, the organ as bool, the organ's level away from every candidate:
    where too little of it lies near one; None without such organ)."""
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), SMOOTH_MM / spacing)
    organ = np.asarray(organ, bool)
    elsewhere = organ & ~candidates
    return smooth, organ, (float(np.median(smooth[elsewhere])) if elsewhere.any() else None)


def _padded(tight, spacing, shape):
    """A candidate's bounding box grown by PAD_MM (it holds CONTINUATION_MM too)."""
    pad = [int(np.ceil(PAD_MM / s)) for s in spacing]
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, size)) for s, p, size in zip(tight, pad, shape))


def _delineated_one(candidate, smooth, organ, score, spacing, fallback, level, expand_mm, voxel_ml):
    """One candidate's delineation in its padded box (the candidate itself where the image
    cannot say: no organ to compare with, no contrast, several parts or none)."""
    organ_level, lesion_level, core = _levels(candidate, smooth, organ, score, fallback)
    if organ_level is None or lesion_level == organ_level:
        return candidate
    cut = organ_level + level * (lesion_level - organ_level)
    lesion_side = smooth > cut if lesion_level > organ_level else smooth < cut
    near = ndimage.distance_transform_edt(~candidate, sampling=spacing) <= expand_mm
    grown = (lesion_side & near & (organ | candidate)) | core
    parts, _ = ndimage.label(grown, structure=CONNECTIVITY_26)
    ids = np.unique(parts[core])
    ids = ids[ids > 0]
    sizes = ndimage.sum_labels(np.ones(parts.shape, np.float32), parts, ids) * voxel_ml
    reported = ids[sizes >= DEFAULT_MIN_VOLUME_ML]
    if len(reported) != 1:
        return candidate  # one lesion per verified candidate
    return parts == reported[0]
