"""Real datasets with ground truth, read lazily: MSD and nnU-Net v2 raw (NIfTI), KiTS23, and
DICOM series with a DICOM SEG (see docs/datasets.md).

``open_dataset(path, mapping, organs=None, seen_types=())`` detects the layout and returns a
:class:`Dataset`: ``name``, ``case_ids``, ``load(case_id)`` (one :class:`DatasetCase` in
memory at a time), iteration, ``subset``. The mapping file says what each label value is
(:mod:`diffugts.datasets.mapping`); ``organs`` is a TotalSegmentator output folder for
datasets without organ labels (:mod:`diffugts.datasets.organs`); ``seen_types`` (from the
protocol's split file, :mod:`diffugts.datasets.protocol`) marks lesion types seen in training.
Never imports kfp.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from diffugts.datasets import dicomseg, kits, msd
from diffugts.datasets.case import DatasetCase, build_case, to_eval_case, to_training_case
from diffugts.datasets.layout import Entry, read_nifti_pair
from diffugts.datasets.mapping import Mapping, load_mapping
from diffugts.datasets.organs import OrganSource
from diffugts.errors import InputError

__all__ = [
    "Dataset",
    "DatasetCase",
    "EvalCases",
    "Mapping",
    "OrganSource",
    "load_mapping",
    "open_dataset",
    "to_eval_case",
    "to_training_case",
]


class Dataset:
    def __init__(
        self,
        root: Path,
        layout: str,
        entries: list[Entry],
        mapping: Mapping,
        organs: OrganSource | None = None,
        seen_types=(),
    ):
        self.root, self.layout, self.mapping, self.organs = root, layout, mapping, organs
        self.seen_types = tuple(sorted(seen_types))
        self._entries = {e.case_id: e for e in entries}
        if len(self._entries) != len(entries):
            twice = next(e for e in entries if sum(f.case_id == e.case_id for f in entries) > 1)
            raise InputError(root, f"two cases are named {twice.case_id} ({twice.image.name})")

    @property
    def name(self) -> str:
        return self.mapping.name

    @property
    def case_ids(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[DatasetCase]:
        return (self.load(c) for c in self.case_ids)

    def subset(self, case_ids) -> Dataset:
        missing = [c for c in case_ids if c not in self._entries]
        if missing:
            raise InputError(self.root, f"no case {missing[0]} in this dataset")
        return Dataset(
            self.root, self.layout, [self._entries[c] for c in case_ids], self.mapping, self.organs, self.seen_types
        )

    def with_seen(self, seen_types) -> Dataset:
        return Dataset(self.root, self.layout, list(self._entries.values()), self.mapping, self.organs, seen_types)

    def load(self, case_id: str, show_progress: bool = False, with_organs: bool = True) -> DatasetCase:
        """``with_organs`` False: skip the organ source (evaluation scores lesions only)."""
        entry = self._entries[case_id]
        modality = self.mapping.modality
        if self.layout == "dicom-seg":
            image, labels, label_path, names, modality = dicomseg.read_case(entry, show_progress)
            if modality not in ("CT", "MR"):
                raise InputError(entry.image, f"series modality {modality}: only CT and MR are supported")
        else:
            image, labels, label_path, names = read_nifti_pair(entry)
        organ_masks = self.organs.organs(case_id, image) if self.organs is not None and with_organs else None
        return build_case(
            self.name,
            case_id,
            image,
            labels,
            label_path,
            lambda v: self.mapping.meaning(v, names.get(v)),
            modality,
            self.seen_types,
            organ_masks,
            self.mapping.path,
            str(entry.image),
        )

    def eval_cases(self) -> EvalCases:
        return EvalCases(self)

    def provenance(self) -> dict:
        """What a manifest or a result records: which data, which meanings, which cases."""
        return {
            "name": self.name,
            "layout": self.layout,
            "root": str(self.root),
            "mapping": {"path": self.mapping.path, "sha256": self.mapping.sha256},
            "organs": str(self.organs.root) if self.organs is not None else None,
            "seen_types": list(self.seen_types),
            "cases": self.case_ids,
        }


class EvalCases:
    """A sized, lazy sequence of :class:`diffugts.runners.evaluate.Case` (one in memory at a time)."""

    def __init__(self, *datasets: Dataset):
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __iter__(self):
        for d in self.datasets:
            for case_id in d.case_ids:
                yield to_eval_case(d.load(case_id, with_organs=False))


def detect_layout(root: Path) -> str:
    if not root.is_dir():
        raise InputError(root, "dataset: not a folder")
    if msd.is_msd(root):
        return "msd"
    if kits.is_kits(root):
        return "kits"
    if dicomseg.is_dicom_seg(root):
        return "dicom-seg"
    raise InputError(
        root,
        "not a dataset in a known layout (MSD / nnU-Net dataset.json + imagesTr/labelsTr, "
        "KiTS case_*/imaging.nii.gz, or case folders of DICOM series + DICOM SEG)",
    )


def open_dataset(
    path: str | Path, mapping: str | Path | Mapping, organs: str | Path | None = None, seen_types=()
) -> Dataset:
    root = Path(path)
    mapping = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
    layout = detect_layout(root)
    if layout == "msd":
        layout, entries = msd.discover(root)
    elif layout == "kits":
        entries = kits.discover(root)
    else:
        entries = dicomseg.discover(root)
    if not entries:
        raise InputError(root, "the dataset has no cases")
    return Dataset(root, layout, entries, mapping, OrganSource(organs) if organs else None, seen_types)
