"""The lesion artifact (stage 4's output): per prompt its refined mask, the numbered lesion
instances and their measurements; ``lesions.json`` last (stage, model, targets with their
mask file and lesion ids, lesions, min_volume_ml, instances file)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from diffugts.artifacts.files import check_schema, read_marker, read_on_grid, slug, write_image
from diffugts.artifacts.geometry import Geometry
from diffugts.errors import InputError
from diffugts.utils import atomic

log = logging.getLogger(__name__)

MARKER = "lesions.json"
SCHEMA_VERSION = 1  # written without the field, as attention's (diffugts.artifacts.attention)
INSTANCES = "instances.nii.gz"


def mask_name(n: int, text: str) -> str:
    return f"masks/{n:02d}-{slug(text)}.nii.gz"


@dataclass
class LesionMask:
    """One lesion's voxels, kept as its bounding box and the mask inside it (a full-size
    mask per lesion would cost 80 MB each on a 512 x 512 x 300 CT)."""

    box: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, the box's shape

    def full(self, shape) -> np.ndarray:
        out = np.zeros(shape, bool)
        out[self.box] = self.mask
        return out

    def paint(self, target: np.ndarray, value, k0: int = 0) -> None:
        """Set ``value`` where the lesion is, in ``target`` starting at slice ``k0``."""
        box = (slice(self.box[0].start - k0, self.box[0].stop - k0), *self.box[1:])
        target[box][self.mask] = value


def crops(labels: np.ndarray, ids: dict[int, int]) -> dict[int, LesionMask]:
    """{lesion id: LesionMask} for label values ``ids`` = {label value: lesion id}."""
    out = {}
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None and value in ids:
            out[ids[value]] = LesionMask(box, labels[box] == value)
    return out


@dataclass
class Lesions:
    summary: dict
    instances: np.ndarray  # uint16 ids on the study grid
    masks: list[np.ndarray]  # per target, bool
    root: Path | None = None

    @property
    def targets(self) -> list[dict]:
        return self.summary.get("targets", [])

    @property
    def records(self) -> list[dict]:
        return self.summary.get("lesions", [])

    def lesion_masks(self, geometry: Geometry) -> dict[int, LesionMask]:
        """Each lesion's own voxels, overlaps between targets included.

        ``instances.nii.gz`` gives overlapping voxels to the earlier target only, so each
        target's mask is split again the way the writer did; if that does not reproduce the
        recorded voxel counts (another writer), the instance map is used.
        """
        from diffugts.stages.lesions import split_instances

        by_id = {r["id"]: r for r in self.records}
        min_ml = float(self.summary.get("min_volume_ml", 0.0))
        out: dict[int, LesionMask] = {}
        for target, mask in zip(self.targets, self.masks):
            ids = target.get("lesion_ids", [])
            if not ids:
                continue
            local = split_instances(mask, geometry, min_ml)
            counts = np.bincount(local.ravel())[1:]
            if len(counts) == len(ids) and all(by_id[g]["voxels"] == c for g, c in zip(ids, counts)):
                out.update(crops(local, {n: g for n, g in enumerate(ids, start=1)}))
            else:
                log.warning("lesions of target %s do not match its mask; using instances.nii.gz", target.get("index"))
                out.update(crops(self.instances, {g: g for g in ids}))
        return out


def write(out: str | os.PathLike, lesions: Lesions, geometry: Geometry) -> dict:
    """Per target its mask (uint8, the file its entry names), the instances, marker last."""
    out = Path(out)
    with atomic.staging_dir(out, marker=MARKER) as stage:
        (stage / "masks").mkdir()
        for entry, mask in zip(lesions.targets, lesions.masks):
            write_image(stage / entry["mask"], mask.astype(np.uint8), geometry)
        write_image(stage / lesions.summary.get("instances", INSTANCES), lesions.instances, geometry)
        atomic.write_json(stage / MARKER, lesions.summary)
    lesions.root = out
    return lesions.summary


def read(folder: str | os.PathLike, geometry: Geometry) -> Lesions:
    root = Path(folder)
    summary = read_marker(root, MARKER, "a lesion", "run `diffugts refine` first")
    check_schema(summary, root / MARKER, SCHEMA_VERSION)
    instances = read_on_grid(root / summary.get("instances", INSTANCES), geometry, "instances", np.uint16)
    masks = [read_on_grid(root / t["mask"], geometry, "mask") != 0 for t in summary.get("targets", [])]
    known = {r["id"] for r in summary.get("lesions", [])}
    for t in summary.get("targets", []):
        missing = set(t.get("lesion_ids", [])) - known
        if missing:
            raise InputError(root / MARKER, f"target {t.get('index')} names unknown lesions {sorted(missing)}")
    return Lesions(summary, instances, masks, root)
