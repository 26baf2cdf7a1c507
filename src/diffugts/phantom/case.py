"""One phantom case: spec -> anatomy, lesions, image, ground truth and its description.

Randomness is split into independent streams derived from (cohort seed, case index), so that
- the same (seed, index) gives the same patient in CT and in MR (same anatomy and lesions);
- ``healthy=True`` gives the *same* patient, scanner noise included, without the lesions
  (a pseudo-healthy ground truth for evaluating synthesis);
- changing lesion filters does not change the anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffugts.phantom.anatomy import build_anatomy
from diffugts.phantom.grid import Grid
from diffugts.phantom.labels import ORGAN_BY_NAME, ORGANS
from diffugts.phantom.lesions import LESION_TYPES, Lesion, paint_lesions, place_lesions, prompts
from diffugts.phantom.render import base_image, finish, tissue_values
from diffugts.phantom.split import split_of, unseen_reasons

GENERATOR_VERSION = "1"
DEFAULT_SHAPE = (64, 128, 128)  # (nz, ny, nx)
DEFAULT_SPACING = (2.75, 2.75, 4.0)  # (dx, dy, dz) mm: 352 x 352 x 256 mm field of view
LESION_COUNT_WEIGHTS = (1, 1, 1, 2, 2, 3)  # lesion entries per case (multifocal counts once)


@dataclass(frozen=True)
class CaseSpec:
    seed: int  # cohort seed
    index: int  # case number within the cohort
    modality: str = "CT"  # "CT" or "MR"
    mr_contrast: str | None = None  # "T1" or "T2" when modality == "MR"
    lesion_types: tuple[str, ...] | None = None  # None: all types
    organs: tuple[str, ...] | None = None  # None: all host organs
    split: str = "any"  # "seen", "unseen" or "any": which combinations to draw
    healthy: bool = False
    healthy_fraction: float = 0.15  # when not forced healthy, share of healthy cases
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    spacing: tuple[float, float, float] = DEFAULT_SPACING

    @property
    def case_id(self) -> str:
        return f"phantom_{self.seed}_{self.index:04d}"

    @property
    def render_modality(self) -> str:
        if self.modality == "CT":
            return "CT"
        if self.mr_contrast is None:
            raise ValueError(f"{self.case_id}: an MR phantom needs mr_contrast (T1 or T2)")
        return self.mr_contrast


@dataclass
class Case:
    spec: CaseSpec
    grid: Grid
    image: np.ndarray  # float32 (z, y, x): HU for CT, arbitrary units for MR
    organs: np.ndarray  # uint8 organ labels
    lesion_map: np.ndarray  # uint16 lesion ids (0 = none)
    lesions: list[dict]  # one record per lesion id
    anatomy: dict = field(default_factory=dict)


def streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    names = ("anatomy", "geometry", "plan", "lesions", "render")
    ss = np.random.SeedSequence([int(seed), int(index), 0x9A7]).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, ss)}


def allowed_combinations(spec: CaseSpec) -> list[tuple[str, str]]:
    """(type, organ) pairs a case of this spec may draw from."""
    types = spec.lesion_types or tuple(LESION_TYPES)
    out = []
    for t in types:
        for o in LESION_TYPES[t].organs:
            if spec.organs and o not in spec.organs:
                continue
            s = split_of(spec.modality, o, t)
            if spec.split in ("any", s):
                out.append((t, o))
    return out


def plan_lesions(spec: CaseSpec, rng: np.random.Generator) -> list[tuple[str, str]]:
    combos = allowed_combinations(spec)
    if spec.healthy or not combos or rng.random() < spec.healthy_fraction:
        return []
    n = int(rng.choice(LESION_COUNT_WEIGHTS))
    picks = rng.integers(len(combos), size=n)
    return [combos[i] for i in picks]


def case_grid(spec: CaseSpec, rng: np.random.Generator) -> Grid:
    # where the patient lies in scanner coordinates (table height, table position); multiples
    # of 1/8 mm so DICOM decimal strings and NIfTI float32 hold them exactly
    off = np.round(np.array([rng.uniform(-15, 15), rng.uniform(-30, 10), rng.uniform(-600, -150)]) * 8) / 8
    nz, ny, nx = spec.shape
    dx, dy, dz = (float(s) for s in spec.spacing)
    return Grid((nz, ny, nx), (dx, dy, dz), tuple(off.tolist()))


def generate_case(spec: CaseSpec) -> Case:
    rs = streams(spec.seed, spec.index)
    grid = case_grid(spec, rs["geometry"])
    anat = build_anatomy(grid, rs["anatomy"])
    plan = plan_lesions(spec, rs["plan"])
    lesions = place_lesions(anat, grid, plan, rs["lesions"])
    mod = spec.render_modality
    values, texture = tissue_values(mod, rs["render"])
    img = base_image(anat, values, texture, rs["render"], grid)
    paint_lesions(img, lesions, mod, values, anat)
    img = finish(img, mod, rs["render"], grid, values)
    lesion_map = np.zeros(grid.shape, np.uint16)
    for les in lesions:
        lesion_map[les.box][les.mask] = les.id
    records = [_record(les, spec, grid) for les in lesions]
    return Case(spec, grid, img, anat.organs, lesion_map, records, anat.landmarks)


def _record(les: Lesion, spec: CaseSpec, grid: Grid) -> dict:
    idx = np.argwhere(les.mask) + np.array([s.start for s in les.box])
    n = len(idx)
    vol = n * grid.voxel_ml
    return {
        "id": les.id,
        "type": les.type,
        "type_description": LESION_TYPES[les.type].description,
        "organ": les.organ,
        "organ_label": ORGAN_BY_NAME[les.organ].label,
        "group": les.group,
        "voxels": int(n),
        "volume_ml": round(vol, 3),
        "diameter_mm": round(float((6 * vol * 1000 / np.pi) ** (1 / 3)), 1),
        "centroid_mm": [round(float(v), 2) for v in grid.to_patient(idx.mean(0))],
        "split": split_of(spec.modality, les.organ, les.type),
        "unseen_reasons": unseen_reasons(spec.modality, les.organ, les.type),
        "prompts": prompts(les.type, les.organ),
    }


def organ_table(case: Case) -> list[dict]:
    counts = np.bincount(case.organs.ravel(), minlength=len(ORGANS) + 1)
    return [
        {
            "label": o.label,
            "name": o.name,
            "volume_ml": round(counts[o.label] * case.grid.voxel_ml, 1),
            "normal_prompt": f"normal {o.family} tissue",
        }
        for o in ORGANS
    ]
