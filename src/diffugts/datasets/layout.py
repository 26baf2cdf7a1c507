"""What every layout hands the dataset: one entry per case (read lazily)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Entry:
    case_id: str
    image: Path  # a NIfTI file, or a DICOM series folder
    label: Path | None  # a label NIfTI, or a DICOM SEG file (found when loaded)


def read_nifti_pair(entry: Entry) -> tuple[sitk.Image, np.ndarray, Path, dict]:
    """(image, label values (k, j, i), label path, segment labels {}) of a NIfTI case."""
    from diffugts.datasets.case import check_grids, read_image
    from diffugts.errors import InputError

    image = read_image(entry.image)
    if entry.label is None or not entry.label.is_file():
        raise InputError(entry.label or entry.image, "missing label file")
    label = read_image(entry.label)
    check_grids(image, label, entry.label)
    values = sitk.GetArrayFromImage(label)
    if values.dtype.kind == "f":  # some tools write labels as float; values must still be whole
        if not np.array_equal(values, np.rint(values)):
            raise InputError(entry.label, "label image holds non-integer values")
        values = np.rint(values).astype(np.int32)
    return image, values, entry.label, {}
