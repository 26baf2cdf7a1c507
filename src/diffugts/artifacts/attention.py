"""The attention artifact (stage 2's output): per prompt its coarse map, coarse mask and, for
fused maps, its organ with inclusions, on the study grid; ``attention.json`` last.

Layout: ``maps/NN-slug.nii.gz`` (float32 probability), ``masks/NN-slug.nii.gz`` (uint8),
``organs/NN-slug.nii.gz`` (uint8, fused maps only), ``attention.json`` (stage, model, maps,
device, one entry per prompt: index, prompt, score, threshold, coarse_volume_ml,
max_probability and the file names, timings). Where the package's lesion verifier takes the
normative model's candidates, a prompt's coarse mask holds its candidates too (so synthesis
inpaints them) and its entry says how much of it they are (normative_volume_ml).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffugts.artifacts.files import check_schema, read_binary, read_marker, read_on_grid, slug, write_image
from diffugts.artifacts.geometry import Geometry
from diffugts.errors import InputError
from diffugts.utils import atomic

if TYPE_CHECKING:
    from diffugts.stages.attend import CoarseMaps
    from diffugts.stages.normative import Findings

MARKER = "attention.json"
# Version 1 is the layout above; it is written without the field (every artifact made before
# versioning is version 1), the first change of layout writes 2.
SCHEMA_VERSION = 1
HINT = "run `diffugts attend` first"


@dataclass
class Attention:
    """The artifact in memory. ``summary`` is attention.json's content; per target (its
    ``targets`` entries) the map, the mask and the organ (None where none was written)."""

    summary: dict
    # None where a reader was asked not to read them (read(..., maps=False / masks=False)).
    maps: list[np.ndarray] = field(default_factory=list)  # float32 on the study grid
    masks: list[np.ndarray] = field(default_factory=list)  # bool
    organs: list[np.ndarray | None] = field(default_factory=list)  # bool, fused maps only
    root: Path | None = None
    # In memory only, never written: the coarse stage's maps on the model grid
    # (diffugts.stages.attend.CoarseMaps; evaluate's organ-aware baseline reads their deviation).
    coarse: CoarseMaps | None = None
    # In memory only: each target's normative findings on the model grid (candidates, as the
    # attention stage added them to its mask, and their evidence); refinement verifies these
    # instead of computing them again (read from files, it does).
    normative: list[Findings] | None = None

    @property
    def targets(self) -> list[dict]:
        return self.summary.get("targets", [])

    def threshold(self, n: int) -> float:
        """Target ``n``'s coarse-mask threshold, as the writer recorded it."""
        entry = self.targets[n]
        if "threshold" not in entry:
            raise InputError(self.root / MARKER if self.root else MARKER, f"attention target {n} has no threshold")
        return float(entry["threshold"])

    def for_prompt(self, text: str, index: int) -> tuple[dict, np.ndarray] | None:
        """The attention target for a lesion target: same prompt text, else same index."""
        for n, t in enumerate(self.targets):
            if t.get("prompt", {}).get("text") == text:
                return t, self.maps[n]
        if index < len(self.targets):
            return self.targets[index], self.maps[index]
        return None

    def union(self, target: int | None = None) -> tuple[np.ndarray, list[dict]]:
        """The union of the coarse masks (or target ``target``'s alone) and which were used."""
        picked = range(len(self.targets)) if target is None else [target]
        union = np.zeros(self.masks[0].shape if self.masks else (0, 0, 0), bool)
        used = []
        for n in picked:
            union |= self.masks[n]
            t = self.targets[n]
            used.append({"index": t.get("index"), "prompt": (t.get("prompt") or {}).get("text"), "mask": t.get("mask")})
        return union, used


def file_names(n: int, text: str) -> tuple[str, str, str]:
    name = f"{n:02d}-{slug(text)}.nii.gz"
    return f"maps/{name}", f"masks/{name}", f"organs/{name}"


def write(out: str | os.PathLike, attention: Attention, geometry: Geometry) -> dict:
    """Write ``attention`` (its targets' entries get their file names), ``attention.json``
    last; returns the summary written."""
    out = Path(out)
    summary = attention.summary
    with atomic.staging_dir(out, marker=MARKER) as stage:
        (stage / "maps").mkdir()
        (stage / "masks").mkdir()
        if any(o is not None for o in attention.organs):
            (stage / "organs").mkdir()
        for n, entry in enumerate(summary["targets"]):
            map_name, mask_name, organ_name = file_names(n, entry["prompt"]["text"])
            write_image(stage / map_name, attention.maps[n], geometry)
            write_image(stage / mask_name, attention.masks[n].astype(np.uint8), geometry)
            entry["map"], entry["mask"] = map_name, mask_name
            organ = attention.organs[n]
            if organ is not None:
                write_image(stage / organ_name, organ.astype(np.uint8), geometry)
                entry["organ"] = organ_name
        atomic.write_json(stage / MARKER, summary)
    attention.root = out
    return summary


def read(
    folder: str | os.PathLike, geometry: Geometry, *, maps: bool = True, masks: bool = True, organs: bool = True
) -> Attention:
    """The artifact at ``folder``, its images checked against the study grid; ``maps`` /
    ``masks`` / ``organs`` False: not read (their lists hold None)."""
    root = Path(folder)
    summary = read_marker(root, MARKER, "an attention", HINT)
    check_schema(summary, root / MARKER, SCHEMA_VERSION)
    targets = summary.get("targets")
    if not isinstance(targets, list):
        raise InputError(root / MARKER, "unreadable attention summary (no list of targets)")
    for t in targets:
        needed = [key for key, wanted in (("map", maps), ("mask", masks)) if wanted]
        if not isinstance(t, dict) or not all(t.get(key) for key in needed):
            raise InputError(root / MARKER, f"attention target without a {' or '.join(needed)}: {str(t)[:80]}")
    out = Attention(summary, root=root)
    unread: Any = None  # a part the caller did not ask for
    for t in targets:
        out.maps.append(read_on_grid(root / t["map"], geometry, "map", np.float32) if maps else unread)
        out.masks.append(read_binary(root / t["mask"], geometry, "mask") if masks else unread)
        out.organs.append(read_binary(root / t["organ"], geometry, "organ") if organs and t.get("organ") else None)
    return out
