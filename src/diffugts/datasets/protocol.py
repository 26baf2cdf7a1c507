"""The zero-shot protocol on real data, stated in one split file (JSON)::

    {"seen_types": ["liver-tumor", ...],      lesion types training may see
     "held_out_fraction": 0.2,                 share of each training dataset's cases kept
                                               back and scored as "seen"
     "train":    [{"mapping": "kits23", "path": "kits23/dataset", "organs": "..."}, ...],
     "evaluate": [{"mapping": "msd-task07-pancreas", "path": "Task07_Pancreas"}, ...]}

Paths are relative to a data root. Which case of a training dataset is held out depends on
its name and case id alone (a hash), so the split does not move when cases are added or
listed in another order. The shipped protocol is ``paper-protocol`` (docs/datasets.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from diffugts.datasets.mapping import shipped_dir
from diffugts.errors import InputError


@dataclass(frozen=True)
class Protocol:
    name: str
    seen_types: tuple[str, ...]
    held_out_fraction: float
    train: tuple[dict, ...]
    evaluate: tuple[dict, ...]
    path: str
    sha256: str


def load_protocol(ref: str | Path) -> Protocol:
    path = Path(ref)
    if not path.is_file() and path.suffix != ".json" and "/" not in str(ref):  # a folder does not shadow a name
        path = shipped_dir() / f"{ref}.json"
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
    except FileNotFoundError:
        raise InputError(path, "split file not found") from None
    except IsADirectoryError:
        raise InputError(path, "a folder, not a split file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("seen_types"), list):
        raise InputError(path, 'a split file needs "seen_types" (a list of lesion types)')
    fraction = doc.get("held_out_fraction", 0.2)
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise InputError(path, '"held_out_fraction" must be a number in [0, 1)')
    for role in ("train", "evaluate"):
        items = doc.get(role, [])
        if not isinstance(items, list) or not all(
            isinstance(i, dict) and "mapping" in i and "path" in i for i in items
        ):
            raise InputError(path, f'"{role}" must be a list of {{"mapping": ..., "path": ...}}')
    return Protocol(
        doc.get("name", path.stem),
        tuple(doc["seen_types"]),
        float(fraction),
        tuple(doc.get("train", [])),
        tuple(doc.get("evaluate", [])),
        str(path),
        hashlib.sha256(raw).hexdigest(),
    )


def rank(dataset: str, case_id: str) -> float:
    digest = hashlib.sha256(f"{dataset}/{case_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def is_held_out(dataset: str, case_id: str, fraction: float) -> bool:
    return rank(dataset, case_id) < fraction


def split_cases(dataset, fraction: float) -> tuple[list[str], list[str]]:
    """(training case ids, held-out case ids) of a training dataset. A dataset of two cases or
    more keeps at least one of each (the lowest / highest hash), so small sets validate too."""
    ids = dataset.case_ids
    held = {c for c in ids if is_held_out(dataset.name, c, fraction)}
    ranked = sorted(ids, key=lambda c: rank(dataset.name, c))
    if fraction > 0 and len(ids) >= 2 and not held:
        held = {ranked[0]}
    if len(ids) >= 2 and len(held) == len(ids):
        held.discard(ranked[-1])
    return [c for c in ids if c not in held], [c for c in ids if c in held]


def open_protocol_datasets(protocol: Protocol, data_root: str | Path, role: str):
    """The protocol's datasets of ``role`` ("train" or "evaluate") under ``data_root``."""
    from diffugts.datasets import open_dataset

    root = Path(data_root)

    def mapping(ref: str) -> str:  # a relative mapping file is looked up under the data root first
        return str(root / ref) if not Path(ref).is_absolute() and (root / ref).is_file() else ref

    return [
        open_dataset(
            root / item["path"],
            mapping(item["mapping"]),
            root / item["organs"] if item.get("organs") else None,
            protocol.seen_types,
        )
        for item in getattr(protocol, role)
    ]


def paper_figures() -> dict[str, float]:
    """Dataset name -> the paper's Dice (%) for it."""
    return json.loads((shipped_dir() / "paper-figures.json").read_text())["dice_percent"]
