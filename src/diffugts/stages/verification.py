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
- ``organ``: the target's organ (with inclusions);
- ``spacing_mm``: the grid's voxel spacing (k, j, i), for the geometric features.

Four features are geometry, not intensity (verifiers fitted since 2026-12-04 may use them):
- ``depth_mm``: the candidate's mean depth below its organ's surface. False candidates sit
  where the organ map errs, at its border (the next organ, fat or air scored as this organ);
- ``elongation``: sqrt(smallest / largest eigenvalue) of the candidate's voxel positions in mm
  (1: a ball, near 0: a tube or a sheet); vessels and border slivers are long, masses are not;
- ``depth_rel``: the mean depth over the organ's own thickness (the 95th percentile of its
  voxels' depths). In mm a lesion of a thin organ (pancreas, spleen) lies no deeper than a
  false candidate of a thick one (liver), and a verifier fitted on liver and kidney lesions
  drops it; relative to its organ it does not;
- ``fill`` (since 2026-12-05, fourteenth session): the candidate's volume over the solid
  ellipsoid with its second moments, about 1 for a mass of any size or elongation, less for
  a ragged, branching or hollow candidate (vessels, partial volume along a border).
None is learnt from a lesion type's look, which is why they carry over to unseen types and
to MR, where the coarse map's evidence does not (docs/method.md, "lesion verification").

Four features weigh the normative model's own evidence (``normative`` candidates only;
verifiers fitted since 2026-12-05 may use them):
- ``normative_mean`` / ``normative_max``: the candidate's mean / largest normative score,
  relative to its organ's thresholds (0 at the seed threshold, -1 at the growing one;
  diffugts.stages.normative.relative_score). A lesion stands well above its organ's healthy
  tissue over its whole extent; noise and partial volume just cross the threshold;
- ``organ_log_odds``: the organ network's mean log-odds over the candidate. Tissue the organ
  map barely calls organ (the next organ, a vessel, fat at the border) is where false
  candidates lie;
- ``core_ml`` (since 2026-12-06): log10 of the volume in mL (plus 0.01 mL, so that an empty
  core is still finite) of the candidate's voxels scoring above ``CORE_LEVEL`` (1: as far
  above the seed threshold as that lies above the growing one). A lesion is clearly abnormal
  tissue over much of its extent; most false candidates are tissue just past the growing
  threshold, reached from a few scattered seeds, and their core is small or missing. All such
  voxels count, not only the largest part's, so that a candidate spanning several small foci
  keeps the core of each.
They too say nothing about a lesion type's look: how unusual for its organ, and how surely
inside it.

Two features read the image around a candidate (``normative`` candidates; since 2026-12-06,
twenty-second and twenty-third sessions):
- ``continuation``: log of the volume of tissue like the candidate (its level, as delineation
  reads it), connected to it within 10 mm, over its own volume
  (diffugts.stages.delineation.continuation). A lesion is bounded: its organ surrounds it, so
  the tissue like it is itself (about 0). Most false candidates that survive the other evidence
  sample a larger structure of the same look, a vessel's crossing or branch, the kidney's
  sinus, the next organ scored as this one, which continues past them.
- ``surround``: the share of the first ring of voxels around the candidate (1.5-4.5 mm) that
  is like it (diffugts.stages.delineation.surround): about 0 for a lesion its organ surrounds;
  a candidate along a structure of its own look touches it whether or not it goes on far.

One feature reads where in its organ a candidate lies (``normative`` candidates; since
2026-12-07, twenty-sixth session):
- ``lookalikes``: log of how many normative candidates of lesion-free studies lay near the
  candidate's place in its organ, per study (diffugts.stages.lookalikes; the verifier carries
  that atlas). Healthy anatomy that looks like a lesion (the vena cava's notch of the liver,
  the veins along the pancreas) lies at the same place in every study; a lesion anywhere.

One feature reads the image's local shape over a candidate (``normative`` candidates; since
2026-12-07, twenty-eighth session):
- ``blob``: the share of the candidate's voxels where the image's Hessian at 2.75 mm is a blob
  (three curvatures of one sign, the weakest at least half the strongest): a mass, bright or
  dark. The false candidates that survive the other evidence are mostly vessels (tubes),
  their branchings and the kidney's sinus (sheets and folds); a mass is what a reader calls a
  tumour, whatever its type.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from diffugts.stages.lesions import CONNECTIVITY_26
from diffugts.stages.lookalikes import Lookalikes, places

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
GEOMETRY = ("depth_mm", "elongation", "depth_rel", "fill")
NORMATIVE_EVIDENCE = ("normative_mean", "normative_max", "organ_log_odds", "core_ml")  # normative candidates only
CONTEXT = ("continuation", "surround")  # normative candidates only: what lies around a candidate in the image
SHAPE_IN_IMAGE = ("blob",)  # normative candidates only: the image's local shape over a candidate
PRIOR = ("lookalikes",)  # normative candidates only: where in its organ a candidate lies
CORE_LEVEL = 1.0  # ``core_ml``: the relative normative score a candidate's core exceeds
# ``blob``: the scale (mm) of the image's Hessian, and the least curvature (scale-normalised,
# model intensity units) that counts as shape rather than flat tissue
BLOB_SCALE_MM = 2.75
BLOB_MIN_CURVATURE = 1e-3
KNOWN_FEATURES = FEATURES + GEOMETRY + NORMATIVE_EVIDENCE + CONTEXT + PRIOR + SHAPE_IN_IMAGE
NORMATIVE_ONLY = NORMATIVE_EVIDENCE + CONTEXT + PRIOR + SHAPE_IN_IMAGE  # features of normative candidates only
CANDIDATE_SOURCES = ("refined", "deviation", "normative")


def checked_features(names) -> tuple[str, ...]:
    """``names`` as a tuple, or ValueError unless they are distinct KNOWN_FEATURES."""
    names = tuple(names)
    unknown = [n for n in names if n not in KNOWN_FEATURES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"unknown lesion verifier features {list(names)!r}: give distinct features of {', '.join(KNOWN_FEATURES)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return names


@dataclass(frozen=True)
class Evidence:
    """One target's evidence maps on one grid (see the module docstring)."""

    refined: np.ndarray
    coarse: np.ndarray
    deviation: np.ndarray
    residual: np.ndarray
    organ: np.ndarray
    spacing_mm: tuple[float, float, float] | None = None  # (k, j, i); the geometric features need it
    normative: np.ndarray | None = None  # relative normative score (NORMATIVE_EVIDENCE needs it)
    organ_log_odds: np.ndarray | None = None  # the organ network's for the target's organ
    image: np.ndarray | None = None  # the image the normative model scored (CONTEXT needs it)
    lookalikes: Lookalikes | None = None  # the atlas's look-alikes of the target's organ and modality (PRIOR)


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
    # The look-alike atlas (diffugts.stages.lookalikes.atlas_entry) that ``lookalikes`` reads
    lookalikes: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> LesionVerifier:
        d = dict(d)
        features = checked_features(d.get("features", FEATURES))
        if len(d.get("weights", ())) != len(features):
            raise ValueError(
                f"the lesion verifier has {len(d.get('weights', ()))} weights for {len(features)} features"
            )
        if d.get("candidate_source", "refined") not in CANDIDATE_SOURCES:
            raise ValueError(f"unknown lesion verifier candidate source {d.get('candidate_source')!r}")
        if set(features) & set(NORMATIVE_ONLY) and d.get("candidate_source") != "normative":
            raise ValueError("the lesion verifier's normative features need normative candidates")
        if "lookalikes" in features and not isinstance(d.get("lookalikes"), dict):
            raise ValueError("the lesion verifier weighs look-alikes but carries no look-alike atlas")
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
    mask: np.ndarray,
    evidence: Evidence,
    voxel_ml: float,
    min_volume_ml: float = 0.0,
    features: tuple[str, ...] = FEATURES,
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """The mask's 26-connected components: (labels, ids of those of at least ``min_volume_ml``,
    their (N, F) ``features``, in that order)."""
    labels, n = ndimage.label(np.asarray(mask, bool), structure=CONNECTIVITY_26)
    if n == 0:
        return labels, [], np.zeros((0, len(features)))
    index = np.arange(1, n + 1)
    count = ndimage.sum_labels(np.ones(labels.shape, np.float32), labels, index)
    ids = [int(i) for i, c in zip(index, count) if c * voxel_ml >= min_volume_ml]
    if not ids:
        return labels, [], np.zeros((0, len(features)))
    count = np.asarray([count[i - 1] for i in ids])

    def mean(a):
        return ndimage.mean(np.asarray(a, np.float32), labels, ids)

    @functools.cache
    def depth_map():  # once for both depth features
        if evidence.spacing_mm is None:
            raise ValueError("the depth features need the evidence's spacing_mm")
        organ = np.asarray(evidence.organ) > 0.5
        return ndimage.distance_transform_edt(organ, sampling=evidence.spacing_mm) if organ.any() else None

    def depth():
        d = depth_map()
        return mean(d) if d is not None else np.zeros(len(ids))

    def depth_rel():
        d = depth_map()
        if d is None:
            return np.zeros(len(ids))
        return mean(d) / max(float(np.percentile(d[d > 0], 95)), 1e-6)

    @functools.cache
    def moments():  # once for both shape features
        return _moments(labels, ids, evidence.spacing_mm)

    def evidence_map(name: str):
        a = getattr(evidence, name)
        if a is None:
            raise ValueError(f"the normative features need the evidence's {name} map")
        return np.asarray(a, np.float32)

    compute = {
        "log_volume_ml": lambda: np.log10(count * voxel_ml),
        "refined_mean": lambda: mean(evidence.refined),
        "refined_max": lambda: ndimage.maximum(np.asarray(evidence.refined, np.float32), labels, ids),
        "coarse_mean": lambda: mean(evidence.coarse),
        "deviation_mean": lambda: mean(evidence.deviation),
        "residual_mean": lambda: mean(evidence.residual),
        "organ_fraction": lambda: mean(evidence.organ),
        "depth_mm": depth,
        "depth_rel": depth_rel,
        "elongation": lambda: _elongation(moments()),
        "fill": lambda: _fill(moments(), count * voxel_ml * 1000.0, evidence.spacing_mm),
        "normative_mean": lambda: mean(evidence_map("normative")),
        "normative_max": lambda: ndimage.maximum(evidence_map("normative"), labels, ids),
        "organ_log_odds": lambda: mean(evidence_map("organ_log_odds")),
        "core_ml": lambda: _core_ml(labels, ids, evidence_map("normative"), voxel_ml),
        "continuation": lambda: _context("continuation", labels, ids, evidence),
        "surround": lambda: _context("surround", labels, ids, evidence),
        "lookalikes": lambda: _lookalikes(labels, ids, evidence),
        "blob": lambda: _blob(labels, ids, evidence),
    }
    return labels, ids, np.stack([np.asarray(compute[f](), np.float64) for f in features], 1)


def _core_ml(labels: np.ndarray, ids: list[int], score: np.ndarray, voxel_ml: float) -> np.ndarray:
    """Per component log10(mL + 0.01) of its voxels scoring above CORE_LEVEL."""
    core = ndimage.sum_labels(np.asarray(score) > CORE_LEVEL, labels, ids)
    return np.log10(np.asarray(core, np.float64) * voxel_ml + 0.01)


def _context(name: str, labels: np.ndarray, ids: list[int], evidence: Evidence) -> np.ndarray:
    """A CONTEXT feature (diffugts.stages.delineation's function of that name)."""
    from diffugts.stages import delineation  # it reads CORE_LEVEL from here

    if evidence.image is None or evidence.normative is None or evidence.spacing_mm is None:
        raise ValueError(f"the {name} feature needs the evidence's image, normative score and spacing_mm")
    return getattr(delineation, name)(
        labels, ids, evidence.image, np.asarray(evidence.organ) > 0.5, evidence.normative, evidence.spacing_mm
    )


def _lookalikes(labels: np.ndarray, ids: list[int], evidence: Evidence) -> np.ndarray:
    """The PRIOR feature: the atlas's look-alikes near each component's place in its organ."""
    if evidence.lookalikes is None:
        raise ValueError("the lookalikes feature needs the evidence's look-alike atlas")
    return evidence.lookalikes.feature(places(labels, ids, np.asarray(evidence.organ) > 0.5))


def _blob(labels: np.ndarray, ids: list[int], evidence: Evidence) -> np.ndarray:
    """Per component the share of its voxels where the image's Hessian at BLOB_SCALE_MM is a
    blob: three curvatures of one sign, the weakest at least half the strongest (a mass, bright
    or dark), not a tube (one weak curvature), a sheet (two) or flat tissue. Each component's
    box with a margin of four scales, so the filters cost the candidates, not the volume."""
    if evidence.image is None or evidence.spacing_mm is None:
        raise ValueError("the blob feature needs the evidence's image and spacing_mm")
    from diffugts.stages.normative import hessian_at  # normative reaches this module through delineation

    image = np.asarray(evidence.image, np.float32)
    spacing = np.asarray(evidence.spacing_mm, np.float64)
    sigma = BLOB_SCALE_MM / spacing
    margin = np.ceil(4 * sigma).astype(int) + 1
    out, boxes = [], ndimage.find_objects(labels)
    for i in ids:
        box = tuple(
            slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(boxes[i - 1], margin, labels.shape)
        )
        ev = np.linalg.eigvalsh(hessian_at(image[box], labels[box] == i, BLOB_SCALE_MM, spacing))
        ev = np.take_along_axis(ev, np.argsort(np.abs(ev), axis=1), 1)  # weakest first
        one_sign = (np.sign(ev) == np.sign(ev[:, 2:])).all(1)
        blob = one_sign & (np.abs(ev[:, 0]) >= 0.5 * np.abs(ev[:, 2])) & (np.abs(ev[:, 2]) > BLOB_MIN_CURVATURE)
        out.append(float(blob.mean()) if len(blob) else 0.0)
    return np.asarray(out)


def _moments(labels: np.ndarray, ids: list[int], spacing_mm) -> list[np.ndarray | None]:
    """Per component the covariance (mm²) of its voxel positions in mm (None under 4 voxels:
    too few to tell a shape)."""
    if spacing_mm is None:
        raise ValueError("the shape features (elongation, fill) need the evidence's spacing_mm")
    out, boxes = [], ndimage.find_objects(labels)
    for i in ids:
        box = boxes[i - 1]
        points = np.argwhere(labels[box] == i) * np.asarray(spacing_mm, np.float64)
        out.append(np.cov(points.T) if len(points) >= 4 else None)
    return out


def _elongation(moments: list[np.ndarray | None]) -> np.ndarray:
    """sqrt(smallest / largest eigenvalue): 1 for a ball, towards 0 for a tube or a sheet (1
    under 4 voxels)."""
    out = np.ones(len(moments))
    for n, cov in enumerate(moments):
        if cov is not None:
            ev = np.linalg.eigvalsh(cov)
            out[n] = np.sqrt(max(ev[0], 1e-3) / max(ev[-1], 1e-3))
    return out


def _fill(moments: list[np.ndarray | None], volume_mm3: np.ndarray, spacing_mm) -> np.ndarray:
    """The component's volume over that of the solid ellipsoid with its second moments
    (semi-axes sqrt(5 eigenvalues), volume 4/3 pi sqrt(125 det)): about 1 for a solid ball,
    ellipsoid or rod of any size, less for a ragged, branching or hollow one. The voxels count
    as the boxes they are (each adds spacing² / 12 along its axes), so a one-voxel-thin
    component is not flat; under 4 voxels: 1."""
    box_var = np.diag(np.square(np.asarray(spacing_mm, np.float64)) / 12.0)
    out = np.ones(len(moments))
    for n, cov in enumerate(moments):
        if cov is not None:
            out[n] = volume_mm3[n] / (4.0 / 3.0 * np.pi * np.sqrt(125.0 * np.linalg.det(cov + box_var)))
    return out


def verified(mask: np.ndarray, evidence: Evidence, verifier: LesionVerifier | None, voxel_ml: float) -> np.ndarray:
    """``mask`` without the components the verifier rejects (all kept without a verifier)."""
    return scored_verified(mask, evidence, verifier, voxel_ml)[0]


def scored_verified(
    mask: np.ndarray, evidence: Evidence, verifier: LesionVerifier | None, voxel_ml: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """(:func:`verified`'s mask, each kept voxel's verifier score: the probability that its
    component is a lesion, 0 elsewhere; None without a verifier). The score is what a report
    calls a lesion's confidence: the verifier, not the refinement head, decided it."""
    mask = np.asarray(mask, bool)
    if verifier is None:
        return mask, None
    score = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return mask, score
    labels, ids, feats = candidates(mask, evidence, voxel_ml, features=verifier.features)
    keep = np.zeros(int(labels.max()) + 1, bool)
    value = np.zeros(keep.shape, np.float32)
    for i, s in zip(ids, verifier.scores(feats)):
        keep[i] = s >= verifier.threshold
        value[i] = s if keep[i] else 0.0
    kept = keep[labels] & mask
    score[kept] = value[labels[kept]]
    return kept, score
