"""DICOM ingestion: pick one CT/MR series from a study and write the study artifact.

The study artifact (a directory) holds:

- ``volume.nii``: float32 volume (CT in HU), exact origin / spacing / direction;
- ``headers/NNNNN.dcm``: header-only copies of the source instances (for DICOM SEG/SR);
- ``rejections.json``: every file and series passed over, with a one-line reason;
- ``series.json``: UIDs, geometry, instance list and selection decisions. It is written
  last: a directory without it is not a study artifact.

On failure only ``rejections.json`` is left and :class:`~diffugts.errors.InputError`
is raised with a one-line reason naming the input or the offending file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffugts import __version__
from diffugts.artifacts import study as artifact
from diffugts.errors import InputError, OutputError
from diffugts.stages.ingest.headers import Frame, Rejection, check_image, frames_of, read_header
from diffugts.stages.ingest.rules import Rules, failed_conditions, load_rules
from diffugts.stages.ingest.sources import list_files
from diffugts.stages.ingest.stacks import GeometryPolicy, Stack, analyse, build_stacks
from diffugts.stages.ingest.volume import decode_stack, resample
from diffugts.stages.ingest.writer import header_copies, write_study
from diffugts.utils import atomic
from diffugts.utils.progress import progress

log = logging.getLogger(__name__)

SCHEMA = "diffugts/study-v1"
KIND_WORDS = {
    "not_dicom": "not DICOM",
    "truncated": "truncated",
    "unsupported": "unsupported SOP class",
    "invalid": "invalid",
    "index_file": "DICOMDIR",
}
# What a deflated data set may inflate to beyond its float32 volume budget (its header).
HEADER_SLACK_BYTES = 64 * 2**20


def default_max_voxels() -> int:
    gib = float(os.environ.get("DIFFUGTS_MAX_VOLUME_GB", "8"))
    return int(gib * 2**30 / 4)  # float32 output


@dataclass
class IngestResult:
    out_dir: Path
    series: dict  # the content of series.json
    rejections: list[dict] = field(default_factory=list)

    @property
    def summary(self) -> str:
        v = self.series["volume"]
        size = "x".join(str(n) for n in v["size_ijk"])
        spacing = "x".join(f"{s:.2f}" for s in v["spacing_mm"])
        return f"{self.series['series_label']}: {size} voxels, {spacing} mm"


@dataclass
class LoadedSeries:
    """The chosen series in memory, before anything is written."""

    stack: Stack
    volume: np.ndarray  # float32 (k, j, i)
    series: dict  # series.json without the instance list
    rejections: list[dict]
    headers: list[bytes]  # header-only copy of each source file, in first-use order


def ingest(
    input_ref: str | os.PathLike,
    out_dir: str | os.PathLike,
    **options,
) -> IngestResult:
    """Ingest a folder, file, .zip or s3:// prefix into the study artifact at ``out_dir``.

    Options are those of :func:`load_series`. On failure ``out_dir`` holds only
    ``rejections.json`` and :class:`InputError` is raised.
    """
    out_dir = Path(out_dir)
    atomic.check_output_path(out_dir)
    rejections: list[dict] = []
    try:
        atomic.remove_stale_partials(out_dir)  # staging folders of a killed run
        loaded = load_series(input_ref, rejections=rejections, **options)
        _log_skipped(loaded.rejections, out_dir)
        write_study(out_dir, loaded)
    except BaseException as err:
        # Whatever failed (bad input, a full disk, a bug, Ctrl-C), an earlier run's artifact
        # in out_dir must not stay looking complete.
        with contextlib.suppress(OSError):
            _write_failure(out_dir, rejections)
        if isinstance(err, OSError):  # the output side: disk full, read-only, not a folder
            raise OutputError.from_os(out_dir, err) from None
        raise
    log.info("ingested %s", loaded.stack.label())
    return IngestResult(out_dir=out_dir, series=loaded.series, rejections=loaded.rejections)


def load_series(
    input_ref: str | os.PathLike,
    *,
    rules: str | Path | dict | None = None,
    resample_grid: bool = False,
    spacing_tolerance: float = 0.05,
    oblique_tolerance_deg: float = 5.0,
    max_voxels: int | None = None,
    show_progress: bool = True,
    rejections: list[dict] | None = None,
) -> LoadedSeries:
    """Scan, select, validate and decode one series; nothing is written.

    ``rules``: a preset name ("default", "permissive"), a JSON file or a dict.
    ``resample_grid``: resample tilted / oblique series instead of rejecting them.
    ``rejections`` (optional) collects what was passed over, also when this raises.
    """
    ruleset = load_rules(rules)
    policy = GeometryPolicy(spacing_tolerance, oblique_tolerance_deg, resample_grid, ruleset.invalid_pixel_spacing)
    max_voxels = max_voxels or default_max_voxels()
    rejections = [] if rejections is None else rejections
    with tempfile.TemporaryDirectory(prefix="diffugts-ingest-") as work:
        frames = _scan(input_ref, Path(work), rejections, max_voxels, show_progress)
        stacks = build_stacks(frames)
        for stack in stacks:
            analyse(stack, policy)
            if stack.geometry is not None and _voxels(stack) > max_voxels:
                stack.problems.append(
                    f"volume of {_voxels(stack) * 4 / 2**30:.1f} GiB exceeds the memory "
                    f"limit ({max_voxels * 4 / 2**30:.1f} GiB; DIFFUGTS_MAX_VOLUME_GB)"
                )
        chosen, volume, decisions = _select_and_read(input_ref, stacks, ruleset, rejections, show_progress)
        series = _describe(input_ref, chosen, ruleset, decisions, rejections)
        # Read while zip / S3 sources still exist in the temporary folder.
        headers = header_copies(chosen)
    return LoadedSeries(chosen, volume, series, rejections, headers)


def _log_skipped(rejections: list[dict], out_dir: Path, shown: int = 5) -> None:
    """A few lines, not hundreds: the full list is in rejections.json."""
    files = [r for r in rejections if "file" in r]
    series = [r for r in rejections if "series" in r]
    for r in files[:shown]:
        log.warning("skipped %s: %s", r["file"], r["reason"])
    if len(files) > shown:
        log.warning("skipped %d more files (see %s)", len(files) - shown, out_dir / artifact.REJECTIONS)
    for r in series[:shown]:
        log.info("passed over %s: %s", r["series"], r["reason"])
    if len(series) > shown:
        log.info("passed over %d more series (see %s)", len(series) - shown, out_dir / artifact.REJECTIONS)


def _voxels(stack: Stack) -> int:
    assert stack.geometry is not None  # analyse() set it
    k, j, i = stack.geometry.shape
    return k * j * i


def _scan(input_ref, work: Path, rejections: list[dict], max_voxels: int, show: bool) -> list[Frame]:
    files = list_files(input_ref, work)
    if not files:
        raise InputError(input_ref, "no files found")
    frames: list[Frame] = []
    for src in progress(files, desc="scan", unit="file", enable=show):
        ds = read_header(src, max_voxels * 4 + HEADER_SLACK_BYTES)
        if isinstance(ds, Rejection):
            rejections.append(ds.as_dict())
            continue
        rejected = check_image(src, ds, max_voxels)
        if rejected:
            rejections.append(rejected.as_dict())
            continue
        frames.extend(frames_of(src, ds))
    if not frames:
        if len(files) == 1:
            raise InputError(files[0].path, rejections[0]["reason"])
        if all(r["kind"] == "not_dicom" for r in rejections):
            raise InputError(input_ref, f"no DICOM files ({len(files)} files, none DICOM)")
        counts: dict[str, int] = {}
        for r in rejections:
            counts[r["kind"]] = counts.get(r["kind"], 0) + 1
        tally = ", ".join(f"{n} {KIND_WORDS.get(k, k)}" for k, n in sorted(counts.items()))
        first = rejections[0]
        raise InputError(
            input_ref,
            f"no usable CT or MR images among {len(files)} files ({tally}); e.g. {first['file']}: {first['reason']}",
        )
    return frames


def _select_and_read(input_ref, stacks: list[Stack], rules: Rules, rejections: list[dict], show: bool):
    """Apply the selections in order; read the preferred candidate that decodes."""
    decisions: dict[str, dict[str, Any]] = {s.number: {"stack": s, "reasons": {}, "taken": False} for s in stacks}
    for sel_no, sel in enumerate(rules.selections, start=1):
        name = sel.get("name") or f"selection {sel_no}"
        matches = []
        for s in stacks:
            reasons = failed_conditions(sel.get("conditions", {}), _lookup(s))
            decisions[s.number]["reasons"][name] = reasons
            if not reasons and not s.problems:
                matches.append(s)
        if not matches:
            continue
        studies = {s.study_uid for s in matches}
        if len(studies) > 1:
            raise InputError(
                input_ref,
                f"candidate series come from {len(studies)} different studies; "
                "ingest one study at a time or narrow the rules (StudyInstanceUID)",
            )
        if rules.prefer == "most_instances":
            matches.sort(key=lambda s: (-len(s.frames), -int(s.ds.Rows) * int(s.ds.Columns)))
        for s in matches:
            try:
                volume = decode_stack(s, show)
            except InputError as err:
                s.problems.append(str(err))
                continue
            if s.source_geometry is not None:
                assert s.geometry is not None  # planned with the source geometry
                volume = resample(volume, s.source_geometry, s.geometry)
            decisions[s.number].update(taken=True, selection=name)
            _record_passed_over(decisions, rejections)
            return s, volume, decisions
    _record_passed_over(decisions, rejections)
    raise InputError(input_ref, "no series to analyse: " + _why_none(decisions))


def _lookup(stack: Stack):
    def lookup(key: str):
        if key == "SliceCount":
            return len(stack.frames)
        if key in ("Orientation", "ImageOrientationPatient"):
            return stack.orientation if stack.geometry_known else "Unknown"
        return stack.ds.get(key)

    return lookup


def _main_reasons(d: dict) -> list[str]:
    stack = d["stack"]
    if stack.problems:
        return stack.problems
    # The reasons of the selection that came closest.
    per_sel = [r for r in d["reasons"].values() if r]
    return min(per_sel, key=len) if per_sel else ["not preferred"]


def _record_passed_over(decisions: dict, rejections: list[dict]) -> None:
    for d in decisions.values():
        if not d["taken"]:
            rejections.append({"series": d["stack"].label(), "kind": "series", "reason": "; ".join(_main_reasons(d))})


def _why_none(decisions: dict) -> str:
    items = list(decisions.values())
    shown = [f"{d['stack'].label()}: {'; '.join(_main_reasons(d))}" for d in items[:3]]
    more = f" (+{len(items) - 3} more, see rejections.json)" if len(items) > 3 else ""
    return " | ".join(shown) + more


def _describe(input_ref, stack: Stack, rules: Rules, decisions: dict, rejections: list[dict]) -> dict:
    assert stack.geometry is not None  # analyse() set it
    ds = stack.ds
    modality = stack.modality
    candidates = []
    for d in decisions.values():
        s = d["stack"]
        candidates.append(
            {
                "series": s.number,
                "label": s.label(),
                "series_instance_uid": s.series_uid,
                "taken": d["taken"],
                "selection": d.get("selection"),
                "reasons": [] if d["taken"] else _main_reasons(d),
                "notes": s.notes,
            }
        )
    return {
        "schema": SCHEMA,
        "diffugts_version": __version__,
        "input": os.fspath(input_ref),
        "series_label": stack.label(),
        "study_instance_uid": stack.study_uid,
        "series_instance_uid": stack.series_uid,
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "modality": modality,
        "series_number": _int_or_none(ds.get("SeriesNumber")),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "orientation": stack.orientation if stack.geometry_known else "Unknown",
        "geometry_known": stack.geometry_known,
        "volume": {
            "file": artifact.VOLUME,
            "dtype": "float32",
            "units": "HU" if modality == "CT" else "stored value x rescale",
            **stack.geometry.as_dict(),
        },
        "resampled_from": stack.source_geometry.as_dict() if stack.source_geometry is not None else None,
        "notes": stack.notes,
        "selection": {"rules_source": rules.source, "rules": rules.as_dict(), "candidates": candidates},
        "rejected_files": sum(1 for r in rejections if "file" in r),
    }


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _write_failure(out_dir: Path, rejections: list[dict]) -> None:
    """Leave only rejections.json: nothing that looks like a (stale) study artifact."""
    with contextlib.suppress(FileNotFoundError):
        (out_dir / artifact.MARKER).unlink()
    for name in (artifact.VOLUME,):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()
    shutil.rmtree(out_dir / "headers", ignore_errors=True)
    atomic.write_json(out_dir / artifact.REJECTIONS, {"rejections": rejections})
