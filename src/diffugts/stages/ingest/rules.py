"""Series selection rules, in the spirit of MONAI Deploy's DICOM series selector.

A rules document is JSON::

    {"selections": [
        {"name": "CT or MR axial volume",
         "conditions": {
            "Modality": "^(CT|MR)$",                 # string: regular expression (re.search)
            "ImageType": ["ORIGINAL", "PRIMARY", "!LOCALIZER"],  # list: all of, "!x" = none of
            "SliceThickness": [0.5, 5],              # two numbers: inclusive range, null = open
            "ImageOrientationPatient": "Axial",     # Axial / Coronal / Sagittal / Unknown
            "SliceCount": [3, null]}}],              # derived: slices in the candidate volume
     "prefer": "most_instances",
     "invalid_pixel_spacing": "refuse"}              # or "assume_1mm" (noted in series.json)

Selections are tried in order; the first one that matches any candidate wins, and among
its matches ``prefer`` decides (``most_instances``: the most slices, then the larger
matrix). Keys are DICOM keywords of the series' first instance, plus the derived keys
``SliceCount`` and ``Orientation`` (same as ``ImageOrientationPatient`` with a label).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_dict
from pydicom.multival import MultiValue

from diffugts.errors import ConfigError

DERIVED = {"SliceCount", "Orientation"}
ORIENTATIONS = {"Axial", "Coronal", "Sagittal", "Unknown"}
PREFERENCES = {"most_instances", "first"}
INVALID_SPACING = {"refuse", "assume_1mm"}  # what a zero / negative / absurd Pixel Spacing does

DEFAULT_RULES: dict = {
    "selections": [
        {
            "name": "CT or MR, original primary axial volume",
            "conditions": {
                "Modality": "^(CT|MR)$",
                "ImageType": ["ORIGINAL", "PRIMARY", "!LOCALIZER"],
                "ImageOrientationPatient": "Axial",
                "SliceCount": [3, None],
            },
        }
    ],
    "prefer": "most_instances",
}

# Accepts any CT or MR image, single slices and unknown orientations included.
PERMISSIVE_RULES: dict = {
    "selections": [{"name": "any CT or MR image", "conditions": {"Modality": "^(CT|MR)$"}}],
    "prefer": "most_instances",
}

PRESETS = {"default": DEFAULT_RULES, "permissive": PERMISSIVE_RULES}


@dataclass
class Rules:
    selections: list[dict]
    prefer: str
    source: str  # where they came from, for messages
    invalid_pixel_spacing: str = "refuse"  # or "assume_1mm": a zero / negative Pixel Spacing as 1 mm

    def as_dict(self) -> dict:
        doc = {"selections": self.selections, "prefer": self.prefer}
        if self.invalid_pixel_spacing != "refuse":
            doc["invalid_pixel_spacing"] = self.invalid_pixel_spacing
        return doc


def load_rules(spec: str | Path | dict | None) -> Rules:
    """Rules from a preset name, a JSON file path, inline JSON, or a dict; None = defaults."""
    if spec is None:
        spec = "default"
    if isinstance(spec, dict):
        return _validate(spec, "rules")
    spec = str(spec)
    if spec.lstrip().startswith("{"):  # inline JSON, e.g. a pipeline parameter
        try:
            return _validate(json.loads(spec), "rules")
        except json.JSONDecodeError as err:
            raise ConfigError(f"rules: not valid JSON ({err})") from None
    if spec in PRESETS:
        return _validate(PRESETS[spec], f"{spec} rules")
    path = Path(spec)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{spec}: no such rules file (or use a preset: {', '.join(PRESETS)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{spec}: not a JSON rules file ({err})") from None
    return _validate(doc, spec)


def _validate(doc: Any, source: str) -> Rules:
    def bad(msg: str):
        raise ConfigError(f"{source}: {msg}")

    if not isinstance(doc, dict) or not isinstance(doc.get("selections"), list) or not doc["selections"]:
        bad('expected an object with a non-empty "selections" list')
    prefer = doc.get("prefer", "most_instances")
    if prefer not in PREFERENCES:
        bad(f'"prefer" must be one of {sorted(PREFERENCES)}')
    invalid_spacing = doc.get("invalid_pixel_spacing", "refuse")
    if invalid_spacing not in INVALID_SPACING:
        bad(f'"invalid_pixel_spacing" must be one of {sorted(INVALID_SPACING)}')
    for n, sel in enumerate(doc["selections"], start=1):
        if not isinstance(sel, dict) or not isinstance(sel.get("conditions", {}), dict):
            bad(f'selection {n}: expected an object with a "conditions" object')
        for key, cond in sel.get("conditions", {}).items():
            if key not in DERIVED and key not in keyword_dict:
                bad(f"selection {n}: unknown attribute {key!r} (DICOM keyword or {sorted(DERIVED)})")
            if key in ("ImageOrientationPatient", "Orientation") and isinstance(cond, str):
                if cond not in ORIENTATIONS:
                    bad(f"selection {n}: orientation must be one of {sorted(ORIENTATIONS)}")
                continue
            if isinstance(cond, str):
                try:
                    re.compile(cond)
                except re.error as err:
                    bad(f"selection {n}: {key}: bad regular expression ({err})")
            elif isinstance(cond, list):
                if _is_range(cond):
                    continue
                if not all(isinstance(c, str) for c in cond):
                    bad(f"selection {n}: {key}: a list is either [min, max] or strings")
            elif not isinstance(cond, (int, float, bool)):
                bad(f"selection {n}: {key}: unsupported condition {cond!r}")
    return Rules(selections=doc["selections"], prefer=prefer, source=source, invalid_pixel_spacing=invalid_spacing)


def _is_range(cond: list) -> bool:
    return (
        len(cond) == 2
        and all(c is None or (isinstance(c, (int, float)) and not isinstance(c, bool)) for c in cond)
        and any(c is not None for c in cond)
    )


def _values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def failed_conditions(conditions: dict, lookup) -> list[str]:
    """Reasons the candidate fails these conditions ([] = it matches).

    ``lookup(key)`` returns the candidate's value for a DICOM keyword or derived key.
    """
    reasons = []
    for key, cond in conditions.items():
        value = lookup(key)
        if key in ("ImageOrientationPatient", "Orientation") and isinstance(cond, str):
            label = lookup("Orientation")
            if label != cond:
                reasons.append(f"orientation {label}, not {cond}")
        elif isinstance(cond, str):
            text = "\\".join(_values(value))
            if value is None or not re.search(cond, text):
                reasons.append(f"{key} {_shown(text)} does not match {cond!r}")
        elif isinstance(cond, list) and _is_range(cond):
            lo, hi = cond
            try:
                num = float(value)
            except (TypeError, ValueError):
                reasons.append(f"{key} absent or not a number")
                continue
            if (lo is not None and num < lo) or (hi is not None and num > hi):
                shown = int(num) if num.is_integer() else num
                reasons.append(f"{key} {shown} outside [{_fmt(lo)}, {_fmt(hi)}]")
        elif isinstance(cond, list):
            present = {v.upper() for v in _values(value)}
            for item in cond:
                if item.startswith("!"):
                    if item[1:].upper() in present:
                        reasons.append(f"{key} contains {item[1:]}")
                elif item.upper() not in present:
                    reasons.append(f"{key} lacks {item}")
        else:
            try:
                equal = value is not None and float(value) == float(cond)
            except (TypeError, ValueError):
                equal = False
            if not equal:
                reasons.append(f"{key} is not {cond}")
    return reasons


def _shown(text: str) -> str:
    """A value in a reason: code strings (Modality 'SR') as they are; free text (a Series
    Description can carry a name or an MRN) is not echoed."""
    if not text:
        return "(absent)"
    return repr(text) if re.fullmatch(r"[A-Z0-9 _\\]{1,64}", text) else "(value not shown: free text)"


def _fmt(v) -> str:
    return "-" if v is None else str(v)
