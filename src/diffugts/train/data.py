"""Training cases from the phantom world, on the model grid.

Cases are generated in memory (a 128x128x64 case takes ~0.25 s), so a recipe is defined by
seeds alone. Only what the zero-shot protocol allows reaches training: CT, with "seen"
lesion combinations (see diffugts.phantom.split) or no lesion at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffugts.artifacts.geometry import Geometry
from diffugts.stages.preprocess import Preprocessing, to_model


@dataclass
class TrainingCase:
    case_id: str
    modality: str
    x: np.ndarray  # float32 (k, j, i) in [0, 1] on the model grid
    organs: np.ndarray  # uint8 organ labels on the model grid
    lesions: np.ndarray  # uint16 lesion ids on the model grid
    records: list[dict]  # case.json lesion records (id, type, organ, split, prompts)
    organ_names: dict[int, str]  # label -> organ name
    volume: np.ndarray | None = None  # original intensities (HU) on the model grid, if kept

    def lesion_mask(self, ids) -> np.ndarray:
        return np.isin(self.lesions, list(ids))


def on_model_grid(
    case_id: str,
    modality: str,
    volume: np.ndarray,
    geometry: Geometry,
    organs: np.ndarray,
    lesions: np.ndarray,
    records: list[dict],
    organ_names: dict[int, str],
    prep: Preprocessing,
    keep_volume: bool = False,
    device=None,
) -> TrainingCase:
    """A case on its own grid (intensities, organ and lesion labels) as a training case on the
    model grid: the one place phantoms, phantom folders and dataset cases get there."""
    x, space = to_model(volume, geometry, modality, prep, device=device)
    organs = space.to_model(organs.astype(np.float32), nearest=True)
    lesions = space.to_model(lesions.astype(np.float32), nearest=True)
    kept = space.to_model(volume) if keep_volume else None
    return TrainingCase(
        case_id,
        modality,
        x,
        np.rint(organs).astype(np.uint8),
        np.rint(lesions).astype(np.uint16),
        records,
        organ_names,
        kept,
    )


def phantom_case(
    seed: int,
    index: int,
    prep: Preprocessing,
    split: str = "seen",
    healthy: bool = False,
    modality: str = "CT",
    keep_volume: bool = False,
    healthy_fraction: float = 0.0,
    shape: tuple[int, int, int] | None = None,
) -> TrainingCase:
    """One phantom on the model grid; ``shape`` (z, y, x) shrinks the phantom's field of view
    (the middle of the abdomen) for quick recipes and tests."""
    from diffugts.phantom import CaseSpec, generate_case
    from diffugts.phantom.case import organ_table

    extra: dict[str, Any] = {"shape": tuple(shape)} if shape else {}
    spec = CaseSpec(
        seed=seed,
        index=index,
        modality=modality,
        split=split,
        healthy=healthy,
        healthy_fraction=healthy_fraction,
        mr_contrast=None if modality == "CT" else ("T1" if index % 2 == 0 else "T2"),
        **extra,
    )
    case = generate_case(spec)
    g = case.grid
    geometry = Geometry(g.origin, g.spacing, np.eye(3), g.shape)
    names = {int(o["label"]): o["name"] for o in organ_table(case)}
    return on_model_grid(
        spec.case_id,
        modality,
        case.image,
        geometry,
        case.organs,
        case.lesion_map,
        case.lesions,
        names,
        prep,
        keep_volume,
    )


def case_from_dir(path: Path, prep: Preprocessing, keep_volume: bool = False) -> TrainingCase:
    """A phantom case folder written by ``diffugts phantom`` (volume.nii + labels + case.json);
    ``keep_volume``: with its intensities on the model grid too (as refinement examples need)."""
    import json

    import SimpleITK as sitk

    meta = json.loads((path / "case.json").read_text())
    image = sitk.ReadImage(str(path / "volume.nii"))
    geometry = Geometry.from_sitk(image)
    read = lambda name: sitk.GetArrayFromImage(sitk.ReadImage(str(path / name)))  # noqa: E731
    names = {int(o["label"]): o["name"] for o in meta["organs"]}
    return on_model_grid(
        meta["case_id"],
        meta["modality"],
        sitk.GetArrayFromImage(image),
        geometry,
        read("organs.nii.gz"),
        read("lesions.nii.gz"),
        meta["lesions"],
        names,
        prep,
        keep_volume,
    )
