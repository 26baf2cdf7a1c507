"""Fitting the lesion verifier (diffugts.stages.verification) after the refinement head.

On cases the head never saw (seen lesion types and lesion-free cases, CT, the refinement seed
range): the candidates, components of the head's mask at its calibrated threshold, of the
organ-relative deviation or of the normative model (the verifier's candidate source), cut as
the lesion artifact counts lesions; each candidate is a sample (lesion: it touches a true
lesion). A
class-balanced logistic regression over the component features (every piece of lesion evidence
with a non-negative weight; only the volume is free), then the score threshold with
the best pooled Dice over those cases, every voxel of a dropped true component lost and every
kept false one counted (threshold 0 keeps every candidate, so the verifier cannot do worse on
the cases it was chosen on than its candidates unverified); with ``min_recall``, among the
thresholds that keep at least that share of their true candidates. The fitting cases hold
seen lesion types only, and the best-Dice threshold there drops what does not look like
them; a zero-shot verifier should rather keep a lesion than a clean healthy study.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffugts.networks.refine import SHARED_CHANNELS as SHARED, TARGET_CHANNELS
from diffugts.stages.lookalikes import lookalikes_for
from diffugts.stages.refine import DEVIATION_SCALE, RESIDUAL_GAIN
from diffugts.stages.verification import (
    CONTEXT,
    FEATURES,
    KNOWN_FEATURES,
    PRIOR,
    Evidence,
    LesionVerifier,
    candidates,
    deviation_candidates,
)
from diffugts.train.fusion import fit_logistic
from diffugts.train.refine import Example

THRESHOLDS = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))
# Features that can only count *for* a lesion. Left free, the phantom world teaches the
# opposite for the organ-relative deviation (false candidates at kidney borders deviate more
# than the seen lesions' mean), and the verifier then drops the plainest lesions of other
# organs: on the development seeds it removed every liver lesion a draw had found.
# Depth and compactness count for a lesion too: deeper in its organ, rounder (GEOMETRY), and so
# do the normative score and the organ log-odds (NORMATIVE_EVIDENCE) and a mass in the image
# (SHAPE_IN_IMAGE: blob). The volume is free, and so
# are the features of what surrounds a candidate (CONTEXT: continuation, surround), which count
# against a lesion: tissue like it going on past it, lying around it; and the look-alikes
# near its place (PRIOR), which count against it too.
EVIDENCE = tuple(f for f in KNOWN_FEATURES if f not in ("log_volume_ml", *CONTEXT, *PRIOR))


def example_evidence(
    example: Example, refined: np.ndarray, spacing_kji=None, lookalikes: dict | None = None
) -> Evidence:
    """An example's evidence maps on the model grid, from its input channels; ``lookalikes``:
    the look-alike atlas (diffugts.stages.lookalikes.atlas_entry), if the features read it."""
    own = example.inputs[SHARED:]
    findings = example.findings
    return Evidence(
        refined=refined,
        coarse=own[TARGET_CHANNELS.index("coarse")],
        deviation=own[TARGET_CHANNELS.index("deviation")] * DEVIATION_SCALE,
        residual=example.inputs[3] / RESIDUAL_GAIN,
        organ=own[TARGET_CHANNELS.index("organ")],
        spacing_mm=None
        if spacing_kji is None
        else (float(spacing_kji[0]), float(spacing_kji[1]), float(spacing_kji[2])),
        normative=findings.score if findings is not None else None,
        organ_log_odds=findings.log_odds if findings is not None else None,
        image=findings.image if findings is not None else None,
        lookalikes=lookalikes_for(lookalikes, findings.key)
        if findings is not None and lookalikes is not None
        else None,
    )


def component_samples(
    examples: list[Example],
    probs: list[np.ndarray],
    cut: float,
    voxel_ml: float,
    min_volume_ml: float,
    source: str = "refined",
    deviation_k: float = 2.0,
    features: tuple[str, ...] = FEATURES,
    spacing_kji=None,
    lookalikes: dict | None = None,
) -> list[dict]:
    """Per candidate of each example (a component of the head's mask at ``cut``, of the
    deviation for ``source`` "deviation", of the example's normative candidates for
    "normative"): features, whether it is a lesion, its voxels and
    the true voxels it covers (for the threshold), and its example's index. ``lookalikes``: the
    look-alike atlas the ``lookalikes`` feature reads (diffugts.stages.lookalikes)."""
    out = []
    for n, (ex, prob) in enumerate(zip(examples, probs)):
        evidence = example_evidence(ex, prob, spacing_kji, lookalikes)
        if source == "normative":
            mask = ex.normative if ex.normative is not None else np.zeros(prob.shape, bool)
        elif source == "deviation":
            mask = deviation_candidates(evidence.deviation, deviation_k)
        else:
            mask = prob >= cut
        labels, ids, feats = candidates(mask, evidence, voxel_ml, min_volume_ml, features)
        for i, f in zip(ids, feats):
            m = labels == i
            hit = int((m & ex.truth).sum())
            out.append({"features": f, "lesion": hit > 0, "voxels": int(m.sum()), "hits": hit, "example": n})
    return out


def fit_verifier(
    samples: list[dict],
    truth_voxels: int,
    source: str = "refined",
    deviation_k: float = 2.0,
    features: tuple[str, ...] = FEATURES,
    min_recall: float | None = None,
) -> tuple[LesionVerifier, dict]:
    """The verifier and what it did on its fitting cases (components kept, Dice before/after).
    ``truth_voxels``: every true lesion voxel of those cases (found or not); ``source`` and
    ``deviation_k``: where the samples' candidates came from, ``features`` what they hold
    (:func:`component_samples`). ``min_recall``: only thresholds that keep at least this share
    of the true candidates (None: any threshold)."""
    if min_recall is not None and not 0.0 < min_recall <= 1.0:
        raise ValueError(f"min_recall must lie in (0, 1], not {min_recall}")
    x = np.stack([s["features"] for s in samples])
    y = np.array([s["lesion"] for s in samples], np.float64)
    if y.min() == y.max():
        raise ValueError("the lesion verifier needs both true and false components to fit")
    mean, scale = x.mean(0), x.std(0) + 1e-6
    weights, bias = fit_logistic((x - mean) / scale, y, l2=1e-2, nonnegative=[f in EVIDENCE for f in features])
    verifier = LesionVerifier(
        tuple(float(w) for w in weights),
        bias,
        tuple(float(v) for v in mean),
        tuple(float(v) for v in scale),
        0.0,
        features=tuple(features),
        candidate_source=source,
        deviation_k=deviation_k,
    )
    scores = verifier.scores(x)
    voxels = np.array([s["voxels"] for s in samples])
    hits = np.array([s["hits"] for s in samples])

    def dice(t: float) -> float:
        keep = scores >= t
        return 2 * hits[keep].sum() / max(voxels[keep].sum() + truth_voxels, 1)

    true = y > 0
    allowed = [t for t in THRESHOLDS if min_recall is None or (scores[true] >= t).mean() >= min_recall]
    best = max(allowed, key=lambda t: (dice(t), -t))  # ties: the lower threshold (keep more); 0 is always allowed
    keep = scores >= best
    report = {
        "components": len(samples),
        "lesion_components": int(y.sum()),
        "kept_lesion_components": int((keep & (y > 0)).sum()),
        "kept_false_components": int((keep & (y == 0)).sum()),
        "dice_before": round(dice(0.0), 4),
        "dice_after": round(dice(best), 4),
        **({"min_recall": min_recall} if min_recall is not None else {}),
    }
    return dataclasses.replace(verifier, threshold=float(best)), report
