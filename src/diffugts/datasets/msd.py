"""Medical Segmentation Decathlon and nnU-Net v2 raw layouts (NIfTI):

    dataset.json  imagesTr/  labelsTr/

- MSD: ``dataset.json`` has a ``training`` list of ``{"image": "./imagesTr/liver_0.nii.gz",
  "label": "./labelsTr/liver_0.nii.gz"}``; every file it names must exist.
- nnU-Net v2: ``dataset.json`` has ``file_ending`` (and ``channel_names``); images are
  ``imagesTr/<case><channel:04d><file_ending>``, labels ``labelsTr/<case><file_ending>``. Only
  single-channel datasets (channel 0000) are read.

Nothing but the file list is read here; each case is read when it is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffugts.datasets.layout import Entry
from diffugts.errors import InputError


def is_msd(root: Path) -> bool:
    return (root / "dataset.json").is_file()


def discover(root: Path) -> tuple[str, list[Entry]]:
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(meta_path, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(meta_path, "expected a JSON object")
    if isinstance(meta.get("training"), list):
        return "msd", _msd(root, meta_path, meta["training"])
    if "file_ending" in meta or "channel_names" in meta:
        return "nnunet", _nnunet(root, meta_path, meta)
    raise InputError(meta_path, 'neither an MSD dataset.json ("training" list) nor an nnU-Net v2 one ("file_ending")')


def _msd(root: Path, meta_path: Path, training: list) -> list[Entry]:
    entries = []
    for item in training:
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise InputError(meta_path, 'every "training" entry needs "image" and "label" paths')
        image = (root / item["image"]).resolve()
        label = (root / item["label"]).resolve() if isinstance(item.get("label"), str) else None
        if not image.is_file():
            raise InputError(meta_path, f"names {item['image']}, which does not exist")
        if label is None or not label.is_file():
            raise InputError(
                meta_path,
                f"names {item.get('label')!s} (the label of {item['image']}), which does not exist: missing label file",
            )
        entries.append(Entry(_stem(image.name), image, label))
    if not entries:
        raise InputError(meta_path, 'the "training" list is empty')
    return entries


def _nnunet(root: Path, meta_path: Path, meta: dict) -> list[Entry]:
    ending = meta.get("file_ending", ".nii.gz")
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "?"}
    if len(channels) != 1:
        raise InputError(meta_path, f"{len(channels)} channels: only single-channel datasets are supported")
    images = root / "imagesTr"
    if not images.is_dir():
        raise InputError(images, "no imagesTr folder beside dataset.json")
    entries = []
    for path in sorted(images.glob(f"*_0000{ending}")):
        if path.name.startswith("."):  # macOS resource forks in some downloads
            continue
        case_id = path.name[: -len(f"_0000{ending}")]
        label = root / "labelsTr" / f"{case_id}{ending}"
        if not label.is_file():
            raise InputError(label, f"missing label file (the label of {path.name})")
        entries.append(Entry(case_id, path, label))
    if not entries:
        raise InputError(images, f"no images named <case>_0000{ending}")
    return entries


def _stem(name: str) -> str:
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return name
