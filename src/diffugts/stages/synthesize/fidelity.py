"""How healthy the pseudo-healthy image is, where the truth is known (the phantom world).

Per lesion, with x the input, H the pseudo-healthy image and o the mean of the host organ's
healthy tissue in x (organ voxels outside every lesion and outside the dilated mask):

    fidelity = (mean_lesion(x) - mean_lesion(H)) / (mean_lesion(x) - o)

1 = the lesion now has the organ's intensity, 0 = unchanged, < 0 = moved away, > 1 =
overshoot. It is undefined (None) for a lesion whose mean is within a quarter of the
tissue's standard deviation of o: there is no contrast to remove. Outside the dilated mask
the mean absolute change |H - x| is reported (0 by construction of the paste-back). With
the phantom's healthy twin (the same patient rendered without lesions), the mean absolute
error to it inside each lesion, before (x) and after (H) synthesis.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from diffugts.errors import InputError
from diffugts.artifacts.geometry import Geometry
from diffugts.artifacts.files import read_on_grid

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


def load_phantom_truth(path: str | os.PathLike, geometry: Geometry, volume: np.ndarray | None = None) -> GroundTruth:
    """Ground truth of a phantom case folder (or its case.json): label maps, lesion table and,
    when the generator can rebuild it and it matches ``volume``, the healthy twin."""
    path = Path(path)
    case_json = path / "case.json" if path.is_dir() else path
    try:
        case = json.loads(case_json.read_text())
        files = case["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(case_json, f"not a phantom case description ({err})") from None
    root = case_json.parent
    lesion_map = read_on_grid(root / files["lesions"], geometry, "lesion map").astype(np.int32)
    organ_map = read_on_grid(root / files["organs"], geometry, "organ map").astype(np.int32)
    lesions = [{k: r[k] for k in ("id", "organ_label", "type", "organ") if k in r} for r in case.get("lesions", [])]
    truth = GroundTruth(lesion_map, organ_map, lesions, source=str(case_json))
    truth.healthy = _healthy_twin(case, lesion_map, volume, truth.notes)
    return truth


def _healthy_twin(case: dict, lesion_map: np.ndarray, volume: np.ndarray | None, notes: list[str]):
    from diffugts.phantom import GENERATOR_VERSION, CaseSpec, generate_case

    if case.get("generator_version") != GENERATOR_VERSION:
        notes.append(f"healthy twin not rebuilt: case made by generator version {case.get('generator_version')}, "
                     f"this is {GENERATOR_VERSION}")
        return None
    req, grid = case.get("request", {}), case["grid"]
    spec = CaseSpec(seed=case["seed"], index=case["index"], modality=case["modality"],
                    mr_contrast=case.get("mr_contrast"), lesion_types=tuple(req.get("lesion_types") or ()) or None,
                    organs=tuple(req.get("organs") or ()) or None, split=req.get("split", "any"), healthy=True,
                    shape=tuple(grid["shape_zyx"]), spacing=tuple(grid["spacing_xyz"]))
    twin = generate_case(spec).image.astype(np.float32)
    if volume is not None:
        # The twin equals the case away from its lesions (docs/phantoms.md); check before use.
        far = ~ndimage.binary_dilation(lesion_map > 0, iterations=5)
        if twin.shape != volume.shape or not np.allclose(twin[far], volume[far], atol=0.5):
            notes.append("healthy twin not used: it does not match the study away from the lesions")
            return None
    return twin


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
        entry = {**les, "voxels": int(sel.sum()), "covered_fraction": _r(dilated[sel].mean()),
                 "mean_input": _r(mx, 2), "mean_pseudo_healthy": _r(mh, 2), "healthy_organ_mean": _r(mo, 2),
                 "healthy_organ_sd": _r(sd, 2), "fidelity": _r(frac)}
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
