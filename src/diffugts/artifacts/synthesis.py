"""The synthesis artifact (stage 3's output): the pseudo-healthy study, its difference from
the input and the region that was inpainted, on the study grid; ``synthesis.json`` last
(stage, model, device, parameters, mask, inpainting, paste-back rule, units, files, timings,
fidelity when ground truth was given)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffugts.artifacts.files import check_schema, read_binary, read_marker, read_on_grid, write_image
from diffugts.artifacts.geometry import Geometry
from diffugts.config import SynthesisParams
from diffugts.utils import atomic

MARKER = "synthesis.json"
SCHEMA_VERSION = 1  # written without the field, as attention's (diffugts.artifacts.attention)
HINT = "run `diffugts synthesize` first"
FILES = {
    "pseudo_healthy": "pseudo_healthy.nii.gz",
    "difference": "difference.nii.gz",
    "inpaint_mask": "inpaint_mask.nii.gz",
}


@dataclass
class Synthesis:
    summary: dict
    pseudo_healthy: np.ndarray  # float32, the study's units
    inpainted: np.ndarray | None  # bool: the dilated region that may differ from the input
    root: Path | None = None

    @property
    def params(self) -> SynthesisParams:
        """The parameters it was made with (tile as recorded: a list becomes a tuple)."""
        recorded = dict(self.summary.get("parameters") or {})
        if isinstance(recorded.get("tile"), list):
            recorded["tile"] = tuple(recorded["tile"])
        known = SynthesisParams.__dataclass_fields__
        return SynthesisParams(**{k: v for k, v in recorded.items() if k in known})


def write(out: str | os.PathLike, synthesis: Synthesis, volume: np.ndarray, geometry: Geometry) -> dict:
    """Write the artifact (``volume``: the input study, for the difference image), marker
    last; its ``timings_s`` gain the write time and are rounded to ms."""
    clock = time.perf_counter()
    out = Path(out)
    summary = synthesis.summary
    summary["files"] = dict(FILES)
    difference = (volume.astype(np.float32) - synthesis.pseudo_healthy).astype(np.float32)
    with atomic.staging_dir(out, marker=MARKER) as stage:
        write_image(stage / FILES["pseudo_healthy"], synthesis.pseudo_healthy, geometry)
        write_image(stage / FILES["difference"], difference, geometry)
        if synthesis.inpainted is None:
            raise ValueError("a synthesis without its inpainted region cannot be written")
        write_image(stage / FILES["inpaint_mask"], synthesis.inpainted.astype(np.uint8), geometry)
        if "timings_s" in summary:
            timings = {**summary["timings_s"], "write": time.perf_counter() - clock}
            summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        atomic.write_json(stage / MARKER, summary)
    synthesis.root = out
    return summary


def read(folder: str | os.PathLike, geometry: Geometry, *, inpainted: bool = True) -> Synthesis:
    root = Path(folder)
    summary = read_marker(root, MARKER, "a synthesis", HINT)
    check_schema(summary, root / MARKER, SCHEMA_VERSION)
    files = {**FILES, **(summary.get("files") or {})}
    pseudo = read_on_grid(root / files["pseudo_healthy"], geometry, "pseudo-healthy image", np.float32)
    region = read_binary(root / files["inpaint_mask"], geometry, "inpaint mask") if inpainted else None
    return Synthesis(summary, pseudo, region, root)
