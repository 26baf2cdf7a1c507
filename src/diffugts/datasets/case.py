"""One case of a dataset in memory, on its own grid, shaped like a phantom case.

The lesion map holds lesion *instances* (26-connected components of each lesion label, as
:func:`diffugts.stages.lesions.split_instances` cuts predictions, though with no minimum volume: a
true speck stays a lesion to detect) and ``records`` describe them as a
phantom's ``case.json`` does (id, type, organ, split, voxels, prompts), so evaluation and
training reuse the phantom code paths unchanged. Bridges: :func:`to_training_case` (model
grid, like ``phantom_case``) and :func:`to_eval_case` (``diffugts.runners.evaluate.Case``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from diffugts.artifacts.geometry import Geometry
from diffugts.datasets.mapping import Meaning
from diffugts.datasets.organs import same_grid
from diffugts.errors import InputError
from diffugts.stages.lesions import CONNECTIVITY_26


@dataclass
class DatasetCase:
    dataset: str
    case_id: str
    modality: str
    volume: np.ndarray  # float32 (k, j, i): HU for CT
    geometry: Geometry
    organs: np.ndarray  # uint8 organ labels (see organ_names)
    organ_names: dict[int, str]
    lesions: np.ndarray  # uint16 lesion instance ids (records' "id")
    records: list[dict]
    source: str  # the image file or series folder

    @property
    def lesion_types(self) -> set[str]:
        return {r["type"] for r in self.records}


def read_image(path: Path) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(path, f"cannot read ({' '.join(str(err).split())[:160]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            path,
            f"expected a single-channel 3D image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) (multi-channel tasks are "
            "not supported)",
        )
    return image


def check_grids(image: sitk.Image, label: sitk.Image, label_path: Path) -> None:
    if not same_grid(image, label):
        raise InputError(
            label_path,
            "image and label grids disagree (size "
            f"{image.GetSize()} vs {label.GetSize()}, spacing "
            f"{_r(image.GetSpacing())} vs {_r(label.GetSpacing())}, origin "
            f"{_r(image.GetOrigin())} vs {_r(label.GetOrigin())})",
        )


def _r(values) -> tuple:
    return tuple(round(float(v), 3) for v in values)


def build_case(
    dataset: str,
    case_id: str,
    image: sitk.Image,
    labels: np.ndarray,
    label_path: Path,
    meanings,
    modality: str,
    seen_types,
    organ_masks: dict[str, np.ndarray] | None = None,
    mapping_path: str = "",
    source: str = "",
) -> DatasetCase:
    """``meanings(value) -> Meaning | None`` for every non-zero value in ``labels``; ``seen_types``
    decides each lesion's split; ``organ_masks`` (TotalSegmentator) fill organs the labels lack."""
    volume = sitk.GetArrayFromImage(image).astype(np.float32)
    geometry = Geometry.from_sitk(image)
    values = [int(v) for v in np.unique(labels) if v != 0]
    resolved: dict[int, Meaning] = {}
    for v in values:
        m = meanings(v)
        if m is None:
            raise InputError(label_path, f"label value {v} is not in the mapping {mapping_path}".rstrip())
        resolved[v] = m
    # Organs numbered by label value (a dataset's own order), then the organ source's.
    names = list(
        dict.fromkeys(
            [m.organ for _, m in sorted(resolved.items()) if m.kind in ("organ", "lesion") and m.organ is not None]
            + sorted(organ_masks or {})
        )
    )
    index = {name: n for n, name in enumerate(names, start=1)}
    organs = np.zeros(labels.shape, np.uint8)
    for name, mask in sorted((organ_masks or {}).items()):
        organs[mask] = index[name]
    for v, m in resolved.items():
        if m.kind in ("organ", "lesion") and m.organ is not None:  # a lesion's voxels are its host organ's too
            organs[labels == v] = index[m.organ]
    lesions = np.zeros(labels.shape, np.uint16)
    records: list[dict] = []
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    seen = set(seen_types)
    for v, m in sorted(resolved.items()):
        if m.kind != "lesion":
            continue
        components, n = ndimage.label(labels == v, structure=CONNECTIVITY_26)
        for c in range(1, n + 1):
            mask = components == c
            lesion_id = len(records) + 1
            lesions[mask] = lesion_id
            voxels = int(mask.sum())
            records.append(
                {
                    "id": lesion_id,
                    "type": m.lesion,
                    "organ": m.organ,
                    "label": v,
                    "split": "seen" if m.lesion in seen else "unseen",
                    "voxels": voxels,
                    "volume_ml": round(voxels * voxel_ml, 3),
                    "prompts": list(m.prompts),
                }
            )
    return DatasetCase(
        dataset, case_id, modality, volume, geometry, organs, {i: n for n, i in index.items()}, lesions, records, source
    )


def to_training_case(case: DatasetCase, prep, keep_volume: bool = False, device=None):
    """The case on the model grid, as :func:`diffugts.train.data.phantom_case` makes one."""
    from diffugts.train.data import on_model_grid

    return on_model_grid(
        f"{case.dataset}/{case.case_id}",
        case.modality,
        case.volume,
        case.geometry,
        case.organs,
        case.lesions,
        case.records,
        dict(case.organ_names),
        prep,
        keep_volume,
        device,
    )


def to_eval_case(case: DatasetCase):
    """The case as :func:`diffugts.runners.evaluate.evaluate` scores it."""
    from diffugts.runners.evaluate import Case

    meta = {"case_id": case.case_id, "modality": case.modality, "lesions": case.records, "dataset": case.dataset}
    return Case(case.case_id, Path(case.source), meta, case.volume, case.geometry, case.lesions)
