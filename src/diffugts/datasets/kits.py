"""The KiTS23 layout: ``case_XXXXX/imaging.nii.gz`` + ``case_XXXXX/segmentation.nii.gz``
(the kits23 repository's ``dataset/`` folder; label values 1 kidney, 2 tumor, 3 cyst)."""

from __future__ import annotations

from pathlib import Path

from diffugts.datasets.layout import Entry
from diffugts.errors import InputError


def is_kits(root: Path) -> bool:
    return any(root.glob("case_*/imaging.nii.gz"))


def discover(root: Path) -> list[Entry]:
    entries = []
    for image in sorted(root.glob("case_*/imaging.nii.gz")):
        label = image.parent / "segmentation.nii.gz"
        if not label.is_file():
            raise InputError(label, "missing label file (KiTS layout: segmentation.nii.gz beside imaging.nii.gz)")
        entries.append(Entry(image.parent.name, image, label))
    return entries
