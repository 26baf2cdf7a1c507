"""Label mapping files: what each label value of a dataset means.

One small JSON file per dataset (shipped ones under ``diffugts/data/datasets/``, by name)::

    {"name": "msd-task03-liver", "modality": "CT",
     "labels": {"1": {"organ": "liver"},
                "2": {"lesion": "liver-tumor", "organ": "liver", "prompts": ["liver tumor"]},
                "3": "ignore"}}

- ``organ``: the voxels are that organ (a prompt organ: liver, kidney, "left kidney", ...);
- ``lesion``: a lesion type; ``organ`` is its host (lesions are also part of their host
  organ's region); optional ``prompts`` feed training text (default "<organ> tumor/lesion");
- ``"ignore"``: neither organ nor lesion (e.g. hepatic vessels: not a prompt organ).

Keys are label values, or for a DICOM SEG segment numbers or segment labels. Background (0)
is implicit. JSON keeps this dependency-free; every mistake is one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from diffugts.errors import InputError

MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class Meaning:
    kind: str  # "organ", "lesion" or "ignore"
    organ: str | None = None
    lesion: str | None = None
    prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mapping:
    name: str
    modality: str
    labels: dict[str, Meaning]  # key as written: "2", or a SEG segment label
    path: str
    sha256: str
    extra: dict = field(default_factory=dict)  # e.g. "paper": the paper's figure key

    def value_meanings(self) -> dict[int, Meaning]:
        """Integer label values (the NIfTI layouts)."""
        return {int(k): m for k, m in self.labels.items() if k.isdigit()}

    def lesion_types(self) -> list[str]:
        return sorted({m.lesion for m in self.labels.values() if m.kind == "lesion" and m.lesion is not None})

    def meaning(self, value: int, label: str | None = None) -> Meaning | None:
        """By value first, then (DICOM SEG) by segment label, case-insensitive."""
        if str(value) in self.labels:
            return self.labels[str(value)]
        if label is not None:
            for key, m in self.labels.items():
                if key.lower() == label.strip().lower():
                    return m
        return None


def shipped_dir() -> Path:
    return Path(str(resources.files("diffugts") / "data" / "datasets"))


def shipped_mappings() -> list[str]:
    return sorted(
        p.stem for p in shipped_dir().glob("*.json") if p.stem != "paper-protocol" and p.stem != "paper-figures"
    )


def resolve(ref: str | Path) -> Path:
    """A file path, or the name of a shipped mapping."""
    path = Path(ref)
    # A folder of the same name (a dataset called kits23 beside the command) is not a mapping.
    if path.is_file() or path.suffix == ".json" or "/" in str(ref):
        return path
    shipped = shipped_dir() / f"{ref}.json"
    if shipped.exists():
        return shipped
    raise InputError(ref, f"no such mapping file, and not a shipped mapping ({', '.join(shipped_mappings())})")


def load_mapping(ref: str | Path) -> Mapping:
    path = resolve(ref)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "mapping file not found") from None
    except IsADirectoryError:
        raise InputError(path, "a folder, not a mapping file") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("labels"), dict) or not doc["labels"]:
        raise InputError(path, 'a mapping needs a "labels" object: {"1": {"organ": ...}, ...}')
    name = doc.get("name") or path.stem
    modality = doc.get("modality", "CT")
    if modality not in MODALITIES:
        raise InputError(path, f'"modality" must be one of {", ".join(MODALITIES)}, not {modality!r}')
    labels = {str(k).strip(): _meaning(path, str(k), v) for k, v in doc["labels"].items()}
    if "0" in labels:
        raise InputError(path, "label 0 is the background; leave it out")
    extra = {k: v for k, v in doc.items() if k not in ("name", "modality", "labels")}
    return Mapping(str(name), modality, labels, str(path), hashlib.sha256(raw).hexdigest(), extra)


def _meaning(path: Path, key: str, value) -> Meaning:
    if value == "ignore":
        return Meaning("ignore")
    if not isinstance(value, dict):
        raise InputError(path, f'label {key}: expected {{"organ": ...}}, {{"lesion": ..., "organ": ...}} or "ignore"')
    organ, lesion, prompts = value.get("organ"), value.get("lesion"), value.get("prompts", [])
    if not isinstance(organ, str) or not organ.strip():
        raise InputError(path, f'label {key}: needs "organ" (the organ, or a lesion\'s host organ)')
    if lesion is not None and (not isinstance(lesion, str) or not lesion.strip()):
        raise InputError(path, f'label {key}: "lesion" must be a lesion type name')
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError(path, f'label {key}: "prompts" must be a list of texts')
    unknown = set(value) - {"organ", "lesion", "prompts", "description"}
    if unknown:
        raise InputError(path, f"label {key}: unknown field(s) {', '.join(sorted(unknown))}")
    if lesion is None:
        return Meaning("organ", organ.strip())
    organ = organ.strip()
    return Meaning("lesion", organ, lesion.strip(), tuple(prompts) or (f"{organ} tumor", f"{organ} lesion"))
