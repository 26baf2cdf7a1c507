"""From frames to candidate volumes ("stacks"): group, split, sort, and check geometry.

A DICOM series is split when its frames cannot form one regular grid: different frames
of reference, orientations, matrix sizes, echoes or temporal positions. Each stack is then
sorted along the slice normal and checked for duplicate positions, non-uniform spacing
(missing slices), gantry tilt and obliquity. Problems are one-line reasons, recorded so the
user can see why a series was passed over.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from diffugts.artifacts.geometry import Geometry, nearest_axis_frame, obliquity_deg, orientation_label
from diffugts.stages.ingest.headers import SPACING_RANGE_MM, Frame


@dataclass
class GeometryPolicy:
    spacing_tolerance: float = 0.05  # relative deviation of a slice step from the median
    oblique_tolerance_deg: float = 5.0  # tilted planes within this are stored exactly as is
    resample: bool = False  # resample tilted / oblique stacks instead of rejecting them
    invalid_pixel_spacing: str = "refuse"  # or "assume_1mm" (rules: "invalid_pixel_spacing")


@dataclass
class Stack:
    number: str  # "3", or "3.2" for the second part of a split series 3
    study_uid: str
    series_uid: str
    frames: list[Frame]  # in volume order after analyse()
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    geometry: Geometry | None = None  # of the output volume
    source_geometry: Geometry | None = None  # of the stored slices, when they are resampled
    source_step: np.ndarray | None = None  # world offset between consecutive source slices
    orientation: str = "Unknown"
    geometry_known: bool = True

    @property
    def ds(self):
        return self.frames[0].ds

    @property
    def modality(self) -> str:
        return str(self.ds.get("Modality", ""))

    @property
    def n_files(self) -> int:
        return len({f.source.path for f in self.frames})

    def label(self) -> str:
        """How logs and errors refer to the stack: no UIDs, no patient data. Header text is
        left out (Series Description carries names and MRNs in the wild); the modality
        and series number are checked before they are shown."""
        num = _int_or_none(self.ds.get("SeriesNumber"))
        bits = [_code(self.modality)]
        if num is not None:
            bits.append(f"#{num}")
        bits.append(f"{len(self.frames)} slice{'s' if len(self.frames) != 1 else ''}")
        return f"series {self.number} ({', '.join(bits)})"


def _code(value: str) -> str:
    """A Code String (CS: capitals, digits, space, underscore; 16 at most) as is, else "?"."""
    return value if re.fullmatch(r"[A-Z0-9 _]{1,16}", value) else "?"


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def build_stacks(frames: list[Frame]) -> list[Stack]:
    """Group frames by series, then split each series into regular-grid candidates."""
    by_series: dict[tuple[str, str], list[Frame]] = defaultdict(list)
    for f in frames:
        by_series[(str(f.ds.get("StudyInstanceUID", "")), str(f.ds.get("SeriesInstanceUID", "")))].append(f)

    def series_order(item):
        (_, uid), fs = item
        num = fs[0].ds.get("SeriesNumber")
        try:
            num = int(num)
        except (TypeError, ValueError):
            num = 1 << 30
        return (num, uid)

    stacks: list[Stack] = []
    for n, ((study, series), fs) in enumerate(sorted(by_series.items(), key=series_order), start=1):
        parts = _split(fs)
        modalities = sorted({str(f.ds.get("Modality", "")) for f in fs})
        for p, part in enumerate(parts, start=1):
            stack = Stack(
                number=str(n) if len(parts) == 1 else f"{n}.{p}", study_uid=study, series_uid=series, frames=part
            )
            if len(parts) > 1:
                stack.notes.append(
                    f"series {n} split into {len(parts)} parts (different orientation, "
                    "matrix size, frame of reference, echo or temporal position)"
                )
            if len(modalities) > 1:
                stack.problems.append(f"series mixes modalities ({', '.join(map(_code, modalities))})")
            stacks.append(stack)
    return stacks


def _split(frames: list[Frame]) -> list[list[Frame]]:
    orientations: list[np.ndarray] = []

    def orientation_id(o: np.ndarray | None) -> int:
        if o is None:
            return -1
        for i, ref in enumerate(orientations):
            if np.max(np.abs(ref - o)) < 1e-3:
                return i
        orientations.append(o)
        return len(orientations) - 1

    parts: dict[tuple, list[Frame]] = {}
    for f in frames:
        key = (
            str(f.ds.get("FrameOfReferenceUID", "")),
            int(f.ds.Rows),
            int(f.ds.Columns),
            str(f.ds.get("Modality", "")),
            orientation_id(f.orientation),
            f.split,
        )
        parts.setdefault(key, []).append(f)
    return sorted(parts.values(), key=len, reverse=True)


def analyse(stack: Stack, policy: GeometryPolicy) -> None:
    """Sort the stack's frames and derive its grid, recording problems and notes."""
    stack.frames = _dedupe(stack)
    frames = stack.frames
    spacing_ij = _pixel_spacing(stack, policy)
    if any("Image Orientation (Patient)" in f.invalid for f in frames):
        stack.notes.append("degenerate Image Orientation (Patient) ignored (zero-length or parallel cosines)")
    have_pos = [f.position is not None and f.orientation is not None for f in frames]
    if not any(have_pos):
        _unknown_geometry(stack, spacing_ij)
        return
    if not all(have_pos):
        stack.problems.append("image position or orientation missing on some slices")
        _unknown_geometry(stack, spacing_ij)
        return

    ori = frames[0].orientation
    assert ori is not None  # every frame has a position and an orientation (checked above)
    row, col = ori[:3] / np.linalg.norm(ori[:3]), ori[3:] / np.linalg.norm(ori[3:])
    if abs(row @ col) > 1e-3:
        stack.problems.append("image orientation is not orthogonal")
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    positions = np.stack([f.position for f in frames if f.position is not None])  # all of them (above)
    dist = positions @ normal

    order = np.argsort(dist, kind="stable")
    steps = np.diff(dist)
    if stack.n_files == 1 and len(frames) > 1 and (np.all(steps > 0) or np.all(steps < 0)):
        order = np.arange(len(frames))  # keep a multi-frame file's stored order, as GDCM does
    frames[:] = [frames[i] for i in order]
    positions, dist = positions[order], dist[order]
    stack.orientation = orientation_label(normal)

    n = len(frames)
    sx, sy = spacing_ij
    if n == 1:
        # One slice: SimpleITK's convention for the third spacing.
        sz = frames[0].spacing_between_slices or 1.0
        if "Spacing Between Slices" in frames[0].invalid:
            stack.notes.append("implausible Spacing Between Slices ignored: 1 mm assumed")
            sz = 1.0
        third = normal
    else:
        steps = np.diff(dist)
        mags = np.abs(steps)
        typical = float(np.median(mags))
        dup = int(np.sum(mags < 1e-3 * max(typical, 1.0)))
        if dup:
            stack.problems.append(
                f"{dup + 1} slices share a position along the slice normal (duplicate or repeated acquisitions)"
            )
            typical = float(np.median(mags[mags >= 1e-3 * max(typical, 1.0)])) if dup < len(mags) else 0.0
        if typical > 0:
            worst = int(np.argmax(np.abs(mags - typical)))
            if abs(mags[worst] - typical) > max(0.01, policy.spacing_tolerance * typical) and not dup:
                if mags[worst] > 1.5 * typical:
                    stack.problems.append(
                        f"slice spacing not uniform: gap of {mags[worst]:.2f} mm between slices {worst + 1} "
                        f"and {worst + 2} where {typical:.2f} mm is typical (missing slices?)"
                    )
                else:
                    stack.problems.append(f"slice spacing not uniform: {mags.min():.2f} to {mags.max():.2f} mm")
        sz = typical if typical > 0 else 1.0
        step = (positions[-1] - positions[0]) / (n - 1)
        line = positions[0] + np.arange(n)[:, None] * step
        off_line = float(np.max(np.linalg.norm(positions - line, axis=1)))
        half_pixel = 0.5 * min(sx, sy)
        if off_line > half_pixel and not stack.problems:
            stack.problems.append(f"slice positions do not lie on a line (off by up to {off_line:.1f} mm)")
        third = normal if step @ normal > 0 else -normal
        lateral = step - (step @ normal) * normal
        if np.linalg.norm(lateral) * (n - 1) > half_pixel:
            tilt = float(np.degrees(np.arctan2(np.linalg.norm(lateral), abs(step @ normal))))
            if policy.resample:
                stack.source_step = step
                stack.notes.append(f"gantry tilt of {tilt:.1f} deg: resampled to an orthogonal grid")
            else:
                stack.problems.append(
                    f"gantry tilt of {tilt:.1f} deg (slices are sheared); "
                    "resample (the resample option) to an orthogonal grid"
                )

    direction = np.column_stack([row, col, third])
    stack.geometry = Geometry(positions[0], (sx, sy, sz), direction, (n, frames[0].ds.Rows, frames[0].ds.Columns))
    oblique = obliquity_deg(direction)
    if oblique > policy.oblique_tolerance_deg:
        if policy.resample:
            stack.notes.append(f"oblique by {oblique:.1f} deg: resampled to the nearest axis-aligned grid")
            _plan_axis_aligned(stack)
        else:
            stack.problems.append(
                f"oblique orientation ({oblique:.1f} deg from the patient axes); "
                "resample (the resample option) to an axis-aligned grid"
            )
    elif stack.source_step is not None:
        _plan_deshear(stack)


def _dedupe(stack: Stack) -> list[Frame]:
    """The same instance twice (copied file) is harmless: keep the first copy."""
    seen, out = set(), []
    for f in stack.frames:
        key = (str(f.ds.get("SOPInstanceUID", "")), f.frame)
        if key in seen:
            continue
        seen.add(key)
        out.append(f)
    if len(out) < len(stack.frames):
        stack.notes.append(f"{len(stack.frames) - len(out)} duplicate instance(s) ignored")
    return out


def _pixel_spacing(stack: Stack, policy: GeometryPolicy) -> tuple[float, float]:
    """(along i, along j) in mm; DICOM PixelSpacing is (between rows, between columns).
    A present but implausible value (zero, negative, outside headers.SPACING_RANGE_MM) would
    give wrong volumes: it refuses the stack unless the rules accept it as 1 mm."""
    lo, hi = SPACING_RANGE_MM
    if any("Pixel Spacing" in f.invalid for f in stack.frames):
        if policy.invalid_pixel_spacing == "refuse":
            stack.problems.append(
                f"invalid Pixel Spacing (zero, negative or outside {lo:g}-{hi:g} mm); "
                'rules with "invalid_pixel_spacing": "assume_1mm" accept it'
            )
        else:
            stack.notes.append("invalid Pixel Spacing: 1 mm assumed (rules)")
    spacings = {f.pixel_spacing for f in stack.frames}
    if spacings == {None}:
        stack.notes.append("no pixel spacing: 1 mm assumed")
        return 1.0, 1.0
    if None in spacings:
        stack.problems.append("pixel spacing missing on some slices")
        spacings.discard(None)
    values = np.array(sorted(s for s in spacings if s is not None))
    if np.ptp(values[:, 0]) > 1e-4 * values[:, 0].max() or np.ptp(values[:, 1]) > 1e-4 * values[:, 1].max():
        stack.problems.append(
            f"inconsistent pixel spacing within the series ({values.min():.3f} to {values.max():.3f} mm)"
        )
    row_spacing, col_spacing = values[0]
    return float(col_spacing), float(row_spacing)


def _unknown_geometry(stack: Stack, spacing_ij: tuple[float, float]) -> None:
    """No positions: keep file / frame order and SimpleITK's defaults (origin 0, identity)."""
    stack.frames.sort(key=lambda f: (_instance_number(f), f.frame or 0))
    stack.geometry_known = False
    stack.notes.append("no image position / orientation: grid assumed (origin 0, identity orientation)")
    ds = stack.frames[0].ds
    stack.geometry = Geometry((0, 0, 0), (*spacing_ij, 1.0), np.eye(3), (len(stack.frames), ds.Rows, ds.Columns))


def _instance_number(f: Frame) -> int:
    try:
        return int(f.ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return 0


def _sheared_source(stack: Stack) -> Geometry:
    """The stored slices' grid, whose k axis is the (tilted) step between slices."""
    g = stack.geometry
    assert g is not None  # analyse() set it before planning a resampling
    if stack.source_step is None:
        return g
    step = stack.source_step
    direction = g.direction.copy()
    direction[:, 2] = step / np.linalg.norm(step)
    return Geometry(g.origin, (g.spacing[0], g.spacing[1], np.linalg.norm(step)), direction, g.shape)


def _plan_deshear(stack: Stack) -> None:
    """Tilted gantry: same in-plane grid, third axis along the slice normal."""
    g = stack.geometry
    assert g is not None and stack.source_step is not None  # set by analyse()
    stack.source_geometry = _sheared_source(stack)
    sz = abs(float(stack.source_step @ g.direction[:, 2]))
    stack.geometry = Geometry(g.origin, (g.spacing[0], g.spacing[1], sz), g.direction, g.shape)


def _plan_axis_aligned(stack: Stack) -> None:
    """Oblique planes: an axis-aligned grid covering the same box, same spacings."""
    grid = stack.geometry
    assert grid is not None  # set by analyse()
    src = stack.source_geometry = _sheared_source(stack)
    frame = nearest_axis_frame(grid.direction)
    corners = np.array(
        [[i, j, k] for i in (0, src.shape[2] - 1) for j in (0, src.shape[1] - 1) for k in (0, src.shape[0] - 1)],
        dtype=np.float64,
    )
    along = src.world(corners) @ frame  # corner coordinates along the new axes
    lo, hi = along.min(axis=0), along.max(axis=0)
    # Each new axis keeps the spacing of the stored axis it is closest to.
    spacing = np.array([grid.spacing[int(np.argmax(np.abs(frame[:, c] @ grid.direction)))] for c in range(3)])
    size = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
    stack.geometry = Geometry(frame @ lo, spacing, frame, (size[2], size[1], size[0]))
