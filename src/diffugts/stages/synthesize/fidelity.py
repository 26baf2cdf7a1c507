"""How healthy the pseudo-healthy image is, where the truth is known.

Per lesion, with x the input, H the pseudo-healthy image and o the mean of the host organ's
healthy tissue in x (organ voxels outside every lesion and outside the dilated mask):

    fidelity = (mean_lesion(x) - mean_lesion(H)) / (mean_lesion(x) - o)

1 = the lesion now has the organ's intensity, 0 = unchanged, < 0 = moved away, > 1 =
overshoot. It is undefined (None) for a lesion whose mean is within a quarter of the
tissue's standard deviation of o: there is no contrast to remove. Outside the dilated mask
the mean absolute change |H - x| is reported (0 by construction of the paste-back). With
a healthy twin (the same patient without lesions, which the phantom generator rebuilds), the
mean absolute error to it inside each lesion, before (x) and after (H) synthesis.

The truth comes as a :class:`GroundTruth`: from label maps (:func:`mask_truth`) or from a
phantom case folder (:func:`diffugts.phantom.truth.load_phantom_truth`, in the phantom package:
this stage does not depend on the phantom generator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# A lesion whose mean is closer to the organ's than this many tissue SDs has no contrast.
MIN_CONTRAST_SD = 0.25


@dataclass
class GroundTruth:
    lesion_map: np.ndarray  # integer lesion ids on the study grid, 0 = none
    organ_map: np.ndarray  # integer organ labels on the study grid, 0 = background
    lesions: list[dict]  # per lesion: id, organ_label (and type / organ names when known)
    healthy: np.ndarray | None = None  # the healthy twin (phantoms), study grid, same units as x
    source: str = ""
    notes: list[str] = field(default_factory=list)


def mask_truth(lesion_map: np.ndarray, organ_map: np.ndarray, source: str = "") -> GroundTruth:
    """Ground truth from a lesion mask (binary: one lesion per connected component, or ids)
    and an organ label map; each lesion's organ is the most common label under it."""
    lesion_map = np.asarray(lesion_map)
    if np.isin(np.unique(lesion_map), (0, 1)).all():
        lesion_map, _ = ndimage.label(lesion_map > 0)
    lesion_map = lesion_map.astype(np.int32)
    organ_map = np.asarray(organ_map).astype(np.int32)
    lesions = []
    for lid in np.unique(lesion_map[lesion_map > 0]):
        under = organ_map[lesion_map == lid]
        under = under[under > 0]
        label = int(np.bincount(under).argmax()) if under.size else 0
        lesions.append({"id": int(lid), "organ_label": label})
    return GroundTruth(lesion_map, organ_map, lesions, source=source)


def _r(v, nd=4):
    return None if v is None else round(float(v), nd)


def fidelity(x: np.ndarray, h: np.ndarray, truth: GroundTruth, dilated: np.ndarray) -> dict:
    """The fidelity figures (see the module docstring) as a JSON-ready dict."""
    x = x.astype(np.float64, copy=False)
    h = h.astype(np.float64, copy=False)
    untouched = (truth.lesion_map == 0) & ~dilated
    per = []
    for les in truth.lesions:
        sel = truth.lesion_map == les["id"]
        if not sel.any():
            continue
        mx, mh = x[sel].mean(), h[sel].mean()
        organ = truth.organ_map == les["organ_label"]
        tissue = organ & untouched
        if not tissue.any():  # the dilated mask swallowed the organ: fall back to its lesion-free part
            tissue = organ & (truth.lesion_map == 0)
        mo = sd = frac = None
        if les["organ_label"] > 0 and tissue.any():
            mo, sd = x[tissue].mean(), x[tissue].std()
            if abs(mx - mo) > MIN_CONTRAST_SD * sd:
                frac = (mx - mh) / (mx - mo)
        entry = {
            **les,
            "voxels": int(sel.sum()),
            "covered_fraction": _r(dilated[sel].mean()),
            "mean_input": _r(mx, 2),
            "mean_pseudo_healthy": _r(mh, 2),
            "healthy_organ_mean": _r(mo, 2),
            "healthy_organ_sd": _r(sd, 2),
            "fidelity": _r(frac),
        }
        if truth.healthy is not None:
            twin = truth.healthy[sel].astype(np.float64)
            entry["mae_to_healthy_input"] = _r(np.abs(x[sel] - twin).mean(), 3)
            entry["mae_to_healthy"] = _r(np.abs(h[sel] - twin).mean(), 3)
        per.append(entry)
    defined = [e["fidelity"] for e in per if e["fidelity"] is not None]
    outside = ~dilated
    summary = {
        "definition": "(mean_lesion_x - mean_lesion_H) / (mean_lesion_x - healthy_organ_mean); 1 = fully healthy",
        "mean_fidelity": _r(np.mean(defined)) if defined else None,
        "lesions": per,
        "outside_mask_mae": _r(np.abs(h[outside] - x[outside]).mean(), 6) if outside.any() else 0.0,
        "source": truth.source,
        "notes": truth.notes,
    }
    if truth.healthy is not None and per:
        inside = truth.lesion_map > 0
        twin = truth.healthy.astype(np.float64)
        summary["mae_to_healthy_input"] = _r(np.abs(x[inside] - twin[inside]).mean(), 3)
        summary["mae_to_healthy"] = _r(np.abs(h[inside] - twin[inside]).mean(), 3)
    return summary
