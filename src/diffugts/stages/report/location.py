"""Where a lesion is, in the words a reader uses: "left kidney", and the slice to open in PACS.

- Side: paired organs get "left" / "right" from the lesion centroid's patient x (LPS: +x is the
  patient's left) against the body's midline, the x centre of the body's voxels (CT: above
  -500 HU; MR: above the volume's 20th percentile), not the middle of the field of view, which
  moves with the table. Within MIDLINE_MM of the midline no side is named.
- Slice: the source series' Instance Number of the slice through the lesion's longest axial
  diameter (from that instance's header, kept by ingestion), when the series is stacked along
  the axial axis (axial_axis "k"); a multi-frame instance is named with its frame.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PAIRED = frozenset({"kidney", "lung", "adrenal gland", "breast"})
MIDLINE_MM = 10.0


def body_midline_x(volume: np.ndarray, geometry, modality: str) -> float:
    """Patient x (LPS mm) of the body's centre across the patient."""
    threshold = -500.0 if modality == "CT" else float(np.percentile(volume, 20))
    body = volume > threshold
    if not body.any():
        body = np.ones_like(volume, dtype=bool)
    k, j, i = (np.asarray(a, dtype=np.float64).mean() for a in np.nonzero(body))
    return float(geometry.world([i, j, k])[0])


def side(organ: str | None, centroid_lps_mm, midline_x: float) -> str | None:
    """ "left" / "right" for a paired organ away from the midline, else None."""
    if organ not in PAIRED:
        return None
    offset = float(centroid_lps_mm[0]) - midline_x
    if abs(offset) < MIDLINE_MM:
        return None
    return "left" if offset > 0 else "right"


def site(organ: str | None, lesion_side: str | None) -> str:
    """The lesion's site as a reader says it: "left kidney", "liver", "-" when unknown."""
    if not organ:
        return "-"
    return f"{lesion_side} {organ}" if lesion_side else organ


class Slices:
    """Instance Number of a slice of the source series, read from the headers ingestion kept."""

    def __init__(self, study):
        self.root = study.root
        self.instances = study.series.get("instances") or []

    def label(self, lesion: dict) -> str:
        """ "instance 42" (or "instance 3, frame 42"), or "n/a" when no instance is that slice."""
        k = lesion.get("diameter_slice", lesion.get("largest_slice"))
        if lesion.get("axial_axis") != "k" or k is None or not 0 <= k < len(self.instances):
            return "n/a"
        inst = self.instances[k]
        number = _instance_number(str(self.root / inst["header"])) if inst.get("header") else None
        if number is None:
            return "n/a"
        frame = inst.get("frame_number")
        return f"instance {number}, frame {frame}" if frame else f"instance {number}"


@lru_cache(maxsize=4096)
def _instance_number(path: str) -> int | None:
    import pydicom

    try:
        value = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"]).get("InstanceNumber")
        return None if value in (None, "") else int(value)
    except (OSError, ValueError, TypeError, pydicom.errors.InvalidDicomError):
        return None
