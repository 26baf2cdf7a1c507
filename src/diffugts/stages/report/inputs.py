"""Reading the artifacts the report is made from: lesions (required), attention and
synthesis (optional). Every image must lie on the study grid; a mismatch is bad input."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from diffugts.errors import InputError
from diffugts.artifacts.geometry import Geometry
from diffugts.stages.lesions import MARKER as LESIONS_MARKER
from diffugts.stages.lesions import split_instances
from diffugts.artifacts.study import Study

log = logging.getLogger(__name__)

ATTENTION_MARKER = "attention.json"
SYNTHESIS_MARKER = "synthesis.json"


def read_marker(root: Path, marker: str, what: str) -> dict:
    path = Path(root) / marker
    if not path.is_file():
        raise InputError(root, f"not a {what} artifact (no {marker})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable ({' '.join(str(err).split())[:100]})") from None


def read_on_grid(path: Path, geometry: Geometry, dtype=None) -> np.ndarray:
    """An image that must lie on ``geometry`` (NIfTI holds float32: 1e-3 mm tolerance)."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(path, f"unreadable image ({' '.join(str(err).split())[:100]})") from None
    if not Geometry.from_sitk(image).allclose(geometry, atol=1e-3):
        raise InputError(path, "not on the study grid (shape, origin, spacing or direction differ)")
    array = sitk.GetArrayFromImage(image)
    return array if dtype is None else array.astype(dtype, copy=False)


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
    root: Path
    summary: dict
    instances: np.ndarray  # uint16 ids on the study grid
    masks: list[np.ndarray]  # per target, bool

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
                log.warning("lesions of target %s do not match its mask; using instances.nii.gz",
                            target.get("index"))
                out.update(crops(self.instances, {g: g for g in ids}))
        return out


def load_lesions(path: str | os.PathLike, study: Study) -> Lesions:
    root = Path(path)
    summary = read_marker(root, LESIONS_MARKER, "lesion")
    instances = read_on_grid(root / summary.get("instances", "instances.nii.gz"), study.geometry, np.uint16)
    masks = [read_on_grid(root / t["mask"], study.geometry) != 0 for t in summary.get("targets", [])]
    known = {r["id"] for r in summary.get("lesions", [])}
    for t in summary.get("targets", []):
        missing = set(t.get("lesion_ids", [])) - known
        if missing:
            raise InputError(root / LESIONS_MARKER, f"target {t.get('index')} names unknown lesions {sorted(missing)}")
    return Lesions(root, summary, instances, masks)


@dataclass
class Attention:
    root: Path
    summary: dict
    maps: list[np.ndarray] = field(default_factory=list)  # float32 per target

    def for_prompt(self, text: str, index: int) -> tuple[dict, np.ndarray] | None:
        """The attention target for a lesion target: same prompt text, else same index."""
        targets = self.summary.get("targets", [])
        for n, t in enumerate(targets):
            if t.get("prompt", {}).get("text") == text:
                return t, self.maps[n]
        if index < len(targets):
            return targets[index], self.maps[index]
        return None


def load_attention(path: str | os.PathLike, study: Study) -> Attention:
    root = Path(path)
    summary = read_marker(root, ATTENTION_MARKER, "attention")
    maps = [read_on_grid(root / t["map"], study.geometry, np.float32) for t in summary.get("targets", [])]
    return Attention(root, summary, maps)


@dataclass
class Synthesis:
    root: Path
    summary: dict
    pseudo_healthy: np.ndarray  # float32, same units as the study volume


def load_synthesis(path: str | os.PathLike, study: Study) -> Synthesis:
    root = Path(path)
    summary = read_marker(root, SYNTHESIS_MARKER, "synthesis")
    name = (summary.get("files") or {}).get("pseudo_healthy") or "pseudo_healthy.nii.gz"
    return Synthesis(root, summary, read_on_grid(root / name, study.geometry, np.float32))
