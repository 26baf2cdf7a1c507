"""A phantom case's ground truth for the synthesis fidelity figures (docs/synthesis.md).

The synthesis stage measures fidelity against a
:class:`~diffugts.stages.synthesize.fidelity.GroundTruth` and knows nothing of phantoms; this
module reads one from a case folder written by ``diffugts phantom`` (its label maps and lesion
table) and, when the generator can rebuild it, adds the case's healthy twin.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from diffugts.artifacts.files import read_on_grid
from diffugts.artifacts.geometry import Geometry
from diffugts.errors import InputError
from diffugts.phantom.case import GENERATOR_VERSION, CaseSpec, generate_case
from diffugts.stages.synthesize.fidelity import GroundTruth


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
    if case.get("generator_version") != GENERATOR_VERSION:
        notes.append(
            f"healthy twin not rebuilt: case made by generator version {case.get('generator_version')}, "
            f"this is {GENERATOR_VERSION}"
        )
        return None
    req, grid = case.get("request", {}), case["grid"]
    spec = CaseSpec(
        seed=case["seed"],
        index=case["index"],
        modality=case["modality"],
        mr_contrast=case.get("mr_contrast"),
        lesion_types=tuple(req.get("lesion_types") or ()) or None,
        organs=tuple(req.get("organs") or ()) or None,
        split=req.get("split", "any"),
        healthy=True,
        shape=tuple(grid["shape_zyx"]),
        spacing=tuple(grid["spacing_xyz"]),
    )
    twin = generate_case(spec).image.astype(np.float32)
    if volume is not None:
        # The twin equals the case away from its lesions (docs/phantoms.md); check before use.
        far = ~ndimage.binary_dilation(lesion_map > 0, iterations=5)
        if twin.shape != volume.shape or not np.allclose(twin[far], volume[far], atol=0.5):
            notes.append("healthy twin not used: it does not match the study away from the lesions")
            return None
    return twin
