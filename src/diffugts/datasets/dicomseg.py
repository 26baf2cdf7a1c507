"""DICOM series with a DICOM SEG beside them: ``<root>/<case>/`` holds one case's image
series (any file names) and one Segmentation object (Modality SEG) of that series.

The series is read by the project's ingest (:func:`diffugts.stages.ingest.load_series`: the same
selection, geometry checks and HU rescale as ``diffugts segment``), the SEG by highdicom and
resampled (nearest) onto the series grid. The label value of a voxel is its segment number;
the mapping names segments by number or by segment label.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from diffugts.datasets.layout import Entry
from diffugts.errors import InputError


def is_dicom_seg(root: Path) -> bool:
    return any(_seg_files(d) for d in _case_dirs(root)[:3])


def _case_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _seg_files(folder: Path) -> list[Path]:
    import pydicom

    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # noqa: BLE001 - not DICOM: not a SEG either
            continue
        if getattr(ds, "Modality", None) == "SEG":
            out.append(path)
    return out


def discover(root: Path) -> list[Entry]:
    return [Entry(d.name, d, None) for d in _case_dirs(root)]


def read_case(entry: Entry, show_progress: bool = False) -> tuple[sitk.Image, np.ndarray, Path, dict, str]:
    """(image, segment numbers (k, j, i), SEG path, {segment number: label}, modality)."""
    import highdicom as hd

    from diffugts.stages.ingest import load_series

    segs = _seg_files(entry.image)
    if len(segs) != 1:
        raise InputError(
            entry.image,
            "missing label file (no DICOM SEG beside the series)"
            if not segs
            else f"{len(segs)} DICOM SEG objects; one per case folder",
        )
    seg_path = segs[0]
    loaded = load_series(entry.image, show_progress=show_progress)
    image = sitk.GetImageFromArray(loaded.volume.astype(np.float32))
    assert loaded.stack.geometry is not None  # a loaded series has its grid
    loaded.stack.geometry.to_sitk(image)
    try:
        seg = hd.seg.segread(seg_path)
        # One binary channel per segment, not highdicom's combined map: segments may overlap
        # (an organ segment holding its tumour), which combining refuses.
        volume = seg.get_volume(combine_segments=False)
    except Exception as err:  # noqa: BLE001 - highdicom raises ValueError / AttributeError on bad SEGs
        # Exports often name the file by its SOP Instance UID: the path is scrubbed too.
        raise InputError(
            Path(without_uids(str(seg_path))), f"cannot read the DICOM SEG ({without_uids(str(err))[:160]})"
        ) from None
    combined = _paint(np.asarray(volume.array), list(seg.segment_numbers))
    labels_img = sitk.Resample(_to_sitk(combined, volume.affine), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    labels = sitk.GetArrayFromImage(labels_img).astype(np.int32)
    names = {int(n): seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    return image, labels, seg_path, names, loaded.stack.modality


def without_uids(text: str) -> str:
    """One line, UIDs (highdicom's messages quote them) replaced: never in a log line."""
    return re.sub(r"\b\d+(\.\d+){3,}\b", "<UID>", " ".join(text.split()))


def _paint(stack: np.ndarray, numbers: list[int]) -> np.ndarray:
    """Segment channels (k, j, i, segments) as one map of segment numbers, the largest segment
    painted first, so one inside another (a tumour in its organ) stays visible."""
    stack = stack.reshape(*stack.shape[:3], -1)
    out = np.zeros(stack.shape[:3], np.uint16)
    sizes = [int(np.count_nonzero(stack[..., s])) for s in range(stack.shape[-1])]
    for s in sorted(range(len(sizes)), key=lambda s: -sizes[s]):
        out[stack[..., s] > 0] = numbers[s]
    return out


def _to_sitk(array: np.ndarray, affine) -> sitk.Image:
    """A highdicom volume's array (axes with an LPS affine) as a SimpleITK image."""
    affine = np.asarray(affine, float)
    # highdicom's array axes (0, 1, 2) are SimpleITK's (k, j, i): reverse the affine's columns.
    cols = affine[:3, :3][:, ::-1]
    spacing = np.linalg.norm(cols, axis=0)
    image = sitk.GetImageFromArray(array.astype(np.uint16))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (cols / spacing).reshape(-1)))
    return image
