"""Prove that two output folders hold the same results, file by file.

    python benchmarks/compare_outputs.py A B          # exit 0: identical; 1: some file differs
    python benchmarks/compare_outputs.py A/evaluation.json B/evaluation.json

Made for the no-behaviour-change checks of a refactoring (issue 21): run the old tree and the
new one on the same inputs, then compare what they wrote, e.g. two ``make run`` folders
(``--out`` of pipelines/run_local.py: demo-input/, kfp/, results/), two ``diffugts segment``
folders or two ``diffugts evaluate`` folders. Prints one line per file that differs (or that
only one side has) and a last summary line.

How each file is compared:

- NIfTI (``.nii``, ``.nii.gz``): voxel for voxel (exact, NaN equal to NaN), pixel type, size,
  origin, spacing and direction (exact).
- JSON: the parsed documents, equal after dropping timing fields (keys ``timings``,
  ``timings_s``; keys ending in ``_s`` inside a dict whose key mentions "timing"; keys ending
  in ``_seconds``, as a report's ``report_seconds``) and after the substitutions below on
  every string (keys included). Numbers must be equal exactly.
- DICOM (a ``DICM`` preamble, any name: SEG, SR, the pseudo-healthy series, the inputs): every
  element, pixel data included, except UIDs (VR UI) and dates and times (VR DA, TM, DT);
  strings after the substitutions below.
- Text reports (``.md``, ``.html``, ``.csv``, ``.tsv``, ``.txt``, and files without a suffix
  that are UTF-8 text, as kfp's ``html`` / ``summary`` artifacts): the text after the
  substitutions below.
- Everything else (PNG pictures, ...): byte for byte.

Numbers are compared exactly. Torch's CPU thread count changes float sums in the last bits
(``evaluate``'s anomaly ``score``: 2 threads vs 1 differ by about 1e-7), so make both sides with
the same ``OMP_NUM_THREADS``.

Substitutions (what legitimately differs between two runs of the same code): the folder
root itself (``A``, ``B``, also in their resolved forms), ISO 8601 date-times
(``2026-12-03T14:10:55+00:00``), kfp.local's run-folder time stamps
(``diffugts-cohort-2026-12-03-14-10-22-987115``), cohort run ids (``results/_runs/cohort-<id>``,
paired in time order) and cohort study keys (hashes of a study's input URI, which holds the
root: paired through each run's ``listing.json``). File paths get the same substitutions
before the two sides are paired, so ``results/_runs/<key>.json`` of one run meets its
counterpart in the other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

TEXT_SUFFIXES = {".md", ".html", ".htm", ".csv", ".tsv", ".txt"}
ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?")
KFP_RUN_TIME = re.compile(r"\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-\d{6}")
SKIPPED_DICOM_VRS = {"UI", "DA", "TM", "DT"}
MAX_DETAILS = 3  # differences named per file


def _token(value: str) -> str:
    """A regex for ``value`` as a whole token: not part of a longer word, number or UID."""
    return r"(?<![0-9A-Za-z])(?<![0-9]\.)" + re.escape(value) + r"(?![0-9A-Za-z])(?!\.[0-9])"


class Normaliser:
    """The substitutions of one side (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        roots = {os.fspath(root), os.fspath(root.resolve()), os.fspath(root.absolute())}
        self._roots = re.compile("|".join(re.escape(r) + r"(?![\w.-])" for r in sorted(roots, key=len, reverse=True)))
        self._tokens: dict[str, str] = {}
        self._pattern: re.Pattern | None = None
        if root.is_dir():
            self._find_runs()
            self._find_study_keys()

    def _add(self, token: str, placeholder: str) -> None:
        if token:
            self._tokens[token] = placeholder
            self._pattern = None

    def _find_runs(self) -> None:
        runs = []
        for path in self.root.rglob("cohort-*.json"):
            if path.parent.name != "_runs":
                continue
            doc = _read_json(path)
            run = doc.get("run") if isinstance(doc, dict) else None
            runs.append((str(doc.get("time", "")) if isinstance(doc, dict) else "", str(run or path.stem[7:])))
        for n, (_, run) in enumerate(sorted(runs)):
            self._add(run, f"<run{n}>")

    def _find_study_keys(self) -> None:
        for path in self.root.rglob("listing.json"):
            doc = _read_json(path)
            if not isinstance(doc, dict):
                continue
            for item in [*doc.get("pending", []), *doc.get("skipped", [])]:
                if isinstance(item, dict) and item.get("key") and item.get("input_uri"):
                    name = f"<key:{self.text(str(item['input_uri']), keys=False)}>"
                    key = str(item["key"])
                    self._add(key, name)
                    self._add(key[:16], name)  # the short study key of report.json and cohort.csv

    def text(self, s: str, keys: bool = True) -> str:
        s = self._roots.sub("<root>", s)
        s = ISO_DATETIME.sub("<datetime>", s)
        s = KFP_RUN_TIME.sub("<kfp-time>", s)
        if keys and self._tokens:
            if self._pattern is None:
                self._pattern = re.compile("|".join(_token(t) for t in sorted(self._tokens, key=len, reverse=True)))
            s = self._pattern.sub(lambda m: self._tokens[m.group(0)], s)
        return s


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- per file type ---------------------------------------------------------------------------


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _is_text(path: Path) -> bool:
    import codecs

    try:
        raw = path.read_bytes()[: 1 << 16]
        codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)  # a cut character is fine
    except (OSError, UnicodeDecodeError):
        return False
    return b"\0" not in raw


def compare_nifti(a: Path, b: Path) -> list[str]:
    import numpy as np
    import SimpleITK as sitk

    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    out = []
    for what in ("PixelIDTypeAsString", "Size", "Origin", "Spacing", "Direction", "NumberOfComponentsPerPixel"):
        va, vb = getattr(ia, f"Get{what}")(), getattr(ib, f"Get{what}")()
        if va != vb:
            out.append(f"{what.lower()} {va} != {vb}")
    if out:
        return out
    xa, xb = sitk.GetArrayViewFromImage(ia), sitk.GetArrayViewFromImage(ib)
    nan = xa.dtype.kind in "fc"
    if not np.array_equal(xa, xb, equal_nan=nan):
        differ = ~((xa == xb) | (np.isnan(xa) & np.isnan(xb))) if nan else xa != xb
        delta = np.abs(xa[differ].astype(np.float64) - xb[differ].astype(np.float64))
        out.append(f"{int(differ.sum())} of {xa.size} voxels differ (max |diff| {float(np.nanmax(delta)):.6g})")
    return out


def is_timing_key(key: str, parent: str) -> bool:
    """``timings`` / ``timings_s`` anywhere, ``*_s`` inside them, ``*_seconds`` anywhere
    (``report_seconds`` of a report's metrics.json)."""
    return key in ("timings", "timings_s") or ("timing" in parent and key.endswith("_s")) or key.endswith("_seconds")


def normalise_json(doc, norm: Normaliser, parent: str = ""):
    """``doc`` without its timing fields, every string (keys included) substituted."""
    if isinstance(doc, dict):
        return {
            norm.text(str(k)): normalise_json(v, norm, str(k))
            for k, v in doc.items()
            if not is_timing_key(str(k), parent)
        }
    if isinstance(doc, list):
        return [normalise_json(v, norm, parent) for v in doc]
    if isinstance(doc, str):
        return norm.text(doc)
    return doc


def json_differences(a, b, where: str = "") -> list[str]:
    """Paths (``/rows/3/dice``) where two normalised documents differ, first ones first."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                out.append(f"{where}/{k} only in {'B' if k not in a else 'A'}")
            else:
                out += json_differences(a[k], b[k], f"{where}/{k}")
            if len(out) >= MAX_DETAILS:
                break
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where or '/'}: {len(a)} != {len(b)} items"]
        out = []
        for n, (x, y) in enumerate(zip(a, b)):
            out += json_differences(x, y, f"{where}/{n}")
            if len(out) >= MAX_DETAILS:
                break
        return out
    same = (
        a == b
        and type(a) is type(b)
        or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    )
    return [] if same else [f"{where or '/'}: {_short(a)} != {_short(b)}"]


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def compare_json(a: Path, b: Path, na: Normaliser, nb: Normaliser) -> list[str]:
    da, db = _read_json(a), _read_json(b)
    if da is None or db is None:
        return compare_bytes(a, b)
    return json_differences(normalise_json(da, na), normalise_json(db, nb))


def _dicom_items(ds, norm: Normaliser, where: str = ""):
    """(tag path, value) of every element except UIDs, dates and times; strings substituted."""
    for elem in ds:
        if elem.VR in SKIPPED_DICOM_VRS:
            continue
        name = f"{where}{elem.keyword or elem.tag}"
        if elem.VR == "SQ":
            yield name, f"{len(elem.value)} items"
            for n, item in enumerate(elem.value):
                yield from _dicom_items(item, norm, f"{name}[{n}].")
            continue
        value = elem.value
        if isinstance(value, (bytes, bytearray)):
            yield name, bytes(value)
        elif isinstance(value, str):
            yield name, norm.text(value)
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            yield name, tuple(norm.text(v) if isinstance(v, str) else str(v) for v in value)
        else:
            yield name, str(value)


def compare_dicom(a: Path, b: Path, na: Normaliser, nb: Normaliser) -> list[str]:
    import pydicom

    out = []
    da, db = pydicom.dcmread(a), pydicom.dcmread(b)
    for part, (ea, eb) in (("meta ", (da.file_meta, db.file_meta)), ("", (da, db))):
        ia, ib = dict(_dicom_items(ea, na)), dict(_dicom_items(eb, nb))
        for name in list(ia) + [n for n in ib if n not in ia]:
            if name not in ia or name not in ib:
                out.append(f"{part}{name} only in {'B' if name not in ia else 'A'}")
            elif ia[name] != ib[name]:
                va, vb = ia[name], ib[name]
                shown = "pixel data" if isinstance(va, bytes) else f"{_short(str(va))} != {_short(str(vb))}"
                out.append(f"{part}{name}: {shown}")
            if len(out) >= MAX_DETAILS:
                return out
    return out


def compare_text(a: Path, b: Path, na: Normaliser, nb: Normaliser) -> list[str]:
    try:
        ta, tb = a.read_text(encoding="utf-8"), b.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return compare_bytes(a, b)
    la, lb = na.text(ta).splitlines(), nb.text(tb).splitlines()
    if la == lb:
        return []
    for n, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return [f"line {n + 1}: {_short(x)} != {_short(y)}"]
    return [f"{len(la)} != {len(lb)} lines"]


def compare_bytes(a: Path, b: Path) -> list[str]:
    ba, bb = a.read_bytes(), b.read_bytes()
    if ba == bb:
        return []
    if len(ba) != len(bb):
        return [f"bytes differ ({len(ba)} != {len(bb)} bytes)"]
    first = next(n for n, (x, y) in enumerate(zip(ba, bb)) if x != y)
    return [f"bytes differ (first at offset {first})"]


def kind_of(a: Path, b: Path) -> str:
    """How two files of the same name are compared: nifti, json, dicom, text or bytes."""
    if _is_nifti(a):
        return "nifti"
    if a.suffix == ".json":
        return "json"
    if _is_dicom(a) and _is_dicom(b):
        return "dicom"
    if a.suffix.lower() in TEXT_SUFFIXES or (not a.suffix and _is_text(a) and _is_text(b)):
        return "text"
    return "bytes"


def compare_files(a: Path, b: Path, na: Normaliser, nb: Normaliser, kind: str | None = None) -> list[str]:
    """What differs between two files of the same (substituted) name; [] when identical."""
    kind = kind or kind_of(a, b)
    try:
        if kind == "nifti":
            return compare_nifti(a, b)
        if kind == "json":
            return compare_json(a, b, na, nb)
        if kind == "dicom":
            return compare_dicom(a, b, na, nb)
        if kind == "text":
            return compare_text(a, b, na, nb)
        return compare_bytes(a, b)
    except Exception as err:  # an unreadable file is a difference, not a crash
        return [f"cannot compare: {type(err).__name__}: {' '.join(str(err).split())[:120]}"]


# -- folders ---------------------------------------------------------------------------------


def _files(root: Path, norm: Normaliser) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            name = norm.text(path.relative_to(root).as_posix())
            out[name if name not in out else path.relative_to(root).as_posix()] = path
    return out


def compare(a: Path, b: Path, kinds: dict[str, int] | None = None) -> tuple[int, list[str]]:
    """(files seen, one line per difference) for two folders, or two files; ``kinds`` (when
    given) counts the files compared by kind."""
    kinds = {} if kinds is None else kinds
    a, b = Path(a), Path(b)
    for side in (a, b):
        if not side.exists():
            raise FileNotFoundError(f"{side}: no such file or folder")
    if a.is_file() != b.is_file():
        raise ValueError("give two folders or two files")
    if a.is_file():
        na, nb = Normaliser(a.parent), Normaliser(b.parent)
        kind = kind_of(a, b)
        kinds[kind] = kinds.get(kind, 0) + 1
        found = compare_files(a, b, na, nb, kind)
        return 1, [f"DIFF  {a.name}: {'; '.join(found)}"] if found else []
    na, nb = Normaliser(a), Normaliser(b)
    fa, fb = _files(a, na), _files(b, nb)
    lines = []
    for name in sorted(set(fa) | set(fb)):
        if name not in fb:
            lines.append(f"ONLY-A {fa[name].relative_to(a).as_posix()}")
        elif name not in fa:
            lines.append(f"ONLY-B {fb[name].relative_to(b).as_posix()}")
        else:
            kind = kind_of(fa[name], fb[name])
            kinds[kind] = kinds.get(kind, 0) + 1
            found = compare_files(fa[name], fb[name], na, nb, kind)
            if found:
                lines.append(f"DIFF  {fa[name].relative_to(a).as_posix()}: {'; '.join(found)}")
    return len(set(fa) | set(fb)), lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="first output folder (or file)")
    ap.add_argument("b", type=Path, help="second output folder (or file)")
    args = ap.parse_args(argv)
    try:
        kinds: dict[str, int] = {}
        count, lines = compare(args.a, args.b, kinds)
    except (FileNotFoundError, ValueError) as err:
        print(f"compare_outputs: error: {err}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    verdict = "identical" if not lines else f"{len(lines)} differ"
    by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"{count} files ({by_kind}): {verdict} ({args.a} vs {args.b})")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
