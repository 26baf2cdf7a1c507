"""Header scan: one cheap read per file, pixel data deferred.

Every file either becomes one or more :class:`Frame` records (one per slice: a classic
image is one frame, an Enhanced CT/MR instance has many) or a :class:`Rejection` with a
one-line reason. Nothing here decodes pixels; the memory guard and the truncation check
use the declared sizes and the byte length recorded in the file.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import parse_fragments
from pydicom.errors import InvalidDicomError
from pydicom.uid import RE_VALID_UID, UID, DeflatedExplicitVRLittleEndian

from diffugts.stages.ingest.sources import SourceFile

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.4"
SUPPORTED_SOP_CLASSES = {CT_IMAGE, ENHANCED_CT, LEGACY_ENHANCED_CT, MR_IMAGE, ENHANCED_MR, LEGACY_ENHANCED_MR}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# Values at least this large stay on disk until needed (the pixel data, in practice).
DEFER_BYTES = 1024
# No CT/MR frame is larger than this in either direction; larger is a corrupt header.
MAX_FRAME_SIDE = 16384
# Pixel spacings outside this range (mm) are not CT / MR geometry (and break SimpleITK).
SPACING_RANGE_MM = (1e-3, 1e3)
# The groups a DICOM data set without the 128-byte preamble can start with: file meta (0002)
# or identifying (0008) elements. Anything else is not parsed at all: forced parsing of, say,
# 64 MiB of zeros takes pydicom half a minute.
PREAMBLELESS_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def max_frames() -> int:
    """Frames per file (``DIFFUGTS_MAX_FRAMES``, default 50000): each declared frame costs
    a slice record before any pixel is read, so the count is bounded on its own."""
    return int(os.environ.get("DIFFUGTS_MAX_FRAMES", "50000"))


@dataclass
class Rejection:
    file: str  # display name, relative to the input
    reason: str
    kind: str  # not_dicom | truncated | unsupported | invalid | index_file | decode

    def as_dict(self) -> dict:
        return {"file": self.file, "kind": self.kind, "reason": self.reason}


@dataclass
class Frame:
    """One 2D slice: a classic instance, or one frame of a multi-frame instance."""

    source: SourceFile
    ds: Dataset  # shared by all frames of a file; pixel data deferred
    frame: int | None  # 0-based frame number in a multi-frame file, None for classic
    position: np.ndarray | None  # ImagePositionPatient, mm (LPS)
    orientation: np.ndarray | None  # ImageOrientationPatient: row cosines, column cosines
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), mm
    slice_thickness: float | None
    spacing_between_slices: float | None
    slope: float
    intercept: float
    split: tuple = field(default=())  # extra keys that must agree within one volume
    pixel_offset: int | None = None  # file offset of the Pixel Data value
    pixel_length: int | None = None  # its length in bytes (None: encapsulated / unknown)
    invalid: tuple = field(default=())  # header values ignored as implausible, e.g. "Pixel Spacing"


def _floats(value, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _either(value: float | None, default: float) -> float:
    return default if value is None else value


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """A functional-group macro item, per-frame first, then shared."""
    for container in (per_frame, shared):
        if container is not None and (item := _first_item(container, keyword)) is not None:
            return item
    return None


def _looks_like_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM" or head[:2] in PREAMBLELESS_GROUPS


def _inflates_beyond(path: Path, limit: int) -> bool:
    """Whether a Deflated Explicit VR file's data set inflates to more than ``limit`` bytes.
    pydicom inflates the whole data set in memory as it reads, so the bound comes first."""
    with open(path, "rb") as f:
        head = f.read(144)
        if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
            return False  # no standard file meta: not a deflated file pydicom would inflate
        meta = pydicom.filereader.read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return False
        f.seek(144 + struct.unpack("<L", head[140:144])[0])  # past the file meta group
        inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while chunk := f.read(1 << 16):
            total += len(inflate.decompress(chunk, limit + 1 - total))
            while inflate.unconsumed_tail and total <= limit:
                total += len(inflate.decompress(inflate.unconsumed_tail, limit + 1 - total))
            if total > limit:
                return True
    return False


def read_header(src: SourceFile, max_bytes: int | None = None) -> Dataset | Rejection:
    """Parse one file's header, or say in one line why it is not a usable image.
    ``max_bytes`` bounds what a deflated data set may inflate to."""
    try:
        if not _looks_like_dicom(src.path):
            return Rejection(src.name, "not a DICOM file", "not_dicom")
        if max_bytes is not None and _inflates_beyond(src.path, max_bytes):
            return Rejection(
                src.name,
                f"deflated data set inflates beyond {max_bytes / 2**30:.3g} GiB, the memory "
                "limit (DIFFUGTS_MAX_VOLUME_GB)",
                "invalid",
            )
    except (OSError, ValueError, zlib.error, InvalidDicomError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else _short(err)
        return Rejection(src.name, f"cannot read the file ({reason})", "invalid")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(src.path, defer_size=DEFER_BYTES)
        eof = [w for w in caught if "end of file" in str(w.message).lower()]
        if eof or len(ds) == 0:
            detail = "the file ends inside its data" if eof else "no data set after the file meta information"
            return Rejection(src.name, f"truncated or corrupt DICOM ({detail})", "truncated")
    except InvalidDicomError:
        # Files without the 128-byte preamble ("DICM") are still common in old exports.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(src.path, defer_size=DEFER_BYTES, force=True)
            if "SOPClassUID" not in ds or "Rows" not in ds:
                raise InvalidDicomError
        except Exception:
            return Rejection(src.name, "not a DICOM file", "not_dicom")
    except (EOFError, OSError, ValueError, KeyError, TypeError, OverflowError) as err:
        return Rejection(src.name, f"truncated or corrupt DICOM header ({_short(err)})", "truncated")
    except Exception as err:  # pydicom raises many types on corrupt input
        return Rejection(src.name, f"corrupt DICOM header ({_short(err)})", "invalid")
    return ds


def _short(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def check_image(src: SourceFile, ds: Dataset, max_voxels: int) -> Rejection | None:
    """Checks that need no pixel decoding: SOP class, pixel module, sizes, truncation."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return Rejection(src.name, "DICOMDIR index file (not an image)", "index_file")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "no SOP Class UID"
        return Rejection(src.name, f"unsupported SOP class: {name} (CT and MR images only)", "unsupported")
    if "PixelData" not in ds:
        return Rejection(src.name, "no pixel data", "invalid")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):
        return Rejection(src.name, "incomplete image pixel module (Rows, Columns, Bits Allocated)", "invalid")
    if samples != 1:
        return Rejection(src.name, f"{samples} samples per pixel: colour images are not CT/MR volumes", "invalid")
    if not (0 < rows <= MAX_FRAME_SIDE and 0 < cols <= MAX_FRAME_SIDE and frames > 0):
        return Rejection(src.name, f"absurd declared dimensions {cols}x{rows}x{frames}", "invalid")
    if bits not in (8, 16, 32):
        return Rejection(src.name, f"unsupported Bits Allocated {bits}", "invalid")
    if frames > max_frames():
        return Rejection(
            src.name, f"{frames} frames declared, above the limit of {max_frames()} (DIFFUGTS_MAX_FRAMES)", "invalid"
        )
    if rows * cols * frames > max_voxels:
        return Rejection(
            src.name,
            f"declared size {cols}x{rows}x{frames} exceeds the memory limit "
            f"({max_voxels * 4 / 2**30:.1f} GiB as float32; DIFFUGTS_MAX_VOLUME_GB)",
            "invalid",
        )
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and (problem := _transfer_syntax_problem(ts)):
        return Rejection(src.name, problem, "unsupported")
    if ts is not None and UID(ts).is_encapsulated:
        return _check_fragments(src, ds, frames, UID(ts))
    if ts is None or not UID(ts).is_compressed:
        raw = ds.get_item(0x7FE00010, keep_deferred=True)
        length = getattr(raw, "length", None)
        expected = rows * cols * frames * bits // 8
        if length is not None and length != 0xFFFFFFFF:
            value_tell = getattr(raw, "value_tell", None)
            available = length
            if value_tell is not None:
                available = min(length, max(0, os.path.getsize(src.path) - value_tell))
            if available < expected:
                return Rejection(
                    src.name, f"pixel data truncated: {available} of {expected} bytes present", "truncated"
                )
    return None


def _transfer_syntax_problem(ts) -> str | None:
    """Why the file's pixel data cannot be decoded, judged from its Transfer Syntax UID
    alone; the value is header text, so a made-up one is not echoed."""
    from pydicom.pixels import get_decoder

    text = str(ts)
    if not re.fullmatch(RE_VALID_UID, text) or not UID(text).is_transfer_syntax:
        return "unknown transfer syntax (the Transfer Syntax UID is not one DICOM defines)"
    try:
        available = get_decoder(text).is_available
    except NotImplementedError:
        available = False
    return None if available else f"transfer syntax {UID(text).name} cannot be decoded here"


def _check_fragments(src: SourceFile, ds: Dataset, frames: int, ts: UID) -> Rejection | None:
    """Encapsulated pixel data holds at least one fragment per frame (PS3.5 A.4): a frame
    count the fragments cannot back is a corrupt or hostile header (1.7 KB declaring 1e8
    frames once took 9.6 GB before any decoding)."""
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    offset = getattr(raw, "value_tell", None)
    if offset is None:
        return None
    endian = "<" if ts.is_little_endian else ">"
    try:
        with open(src.path, "rb") as fp:
            fp.seek(offset)
            head = fp.read(8)
            group, element, length = struct.unpack(f"{endian}HHL", head)
            if (group, element) != (0xFFFE, 0xE000):
                raise ValueError("no Basic Offset Table item")
            fp.seek(length, os.SEEK_CUR)  # past the Basic Offset Table
            fragments, _ = parse_fragments(fp, endianness=endian)
    except (OSError, ValueError, struct.error):
        return Rejection(src.name, "encapsulated pixel data is corrupt (its items cannot be read)", "truncated")
    if fragments < frames:
        return Rejection(
            src.name, f"pixel data truncated: {fragments} fragment(s) for {frames} frames declared", "truncated"
        )
    return None


def frames_of(src: SourceFile, ds: Dataset) -> list[Frame]:
    """Slice records of one image file (classic: one; enhanced multi-frame: one per frame)."""
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    offset = getattr(raw, "value_tell", None)
    length = getattr(raw, "length", None)
    if length == 0xFFFFFFFF:  # encapsulated (compressed) pixel data
        length = None
    if "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames") or 1) > 1:
        frames = _enhanced_frames(src, ds)
    else:
        frames = _classic_frame(src, ds)
    for f in frames:
        f.pixel_offset, f.pixel_length = offset, length
    return frames


def _classic_frame(src: SourceFile, ds: Dataset) -> list[Frame]:
    return [
        Frame(
            source=src,
            ds=ds,
            frame=None,
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_orientation(ds.get("ImageOrientationPatient")),
            pixel_spacing=_spacing(ds.get("PixelSpacing")),
            slice_thickness=_float(ds.get("SliceThickness")),
            spacing_between_slices=_float(ds.get("SpacingBetweenSlices")),
            invalid=_invalid(ds.get("PixelSpacing"), ds.get("ImageOrientationPatient"), ds.get("SpacingBetweenSlices")),
            slope=_either(_float(ds.get("RescaleSlope")), 1.0),
            intercept=_either(_float(ds.get("RescaleIntercept")), 0.0),
            # Multi-echo and dynamic series repeat positions: one volume per echo / phase.
            split=(str(ds.get("EchoNumbers", "")), str(ds.get("TemporalPositionIdentifier", ""))),
        )
    ]


def _spacing(value) -> tuple[float, float] | None:
    arr = _floats(value, 2) if value is not None else None
    if arr is None or not _plausible_spacing(arr):
        return None
    return float(arr[0]), float(arr[1])


def _plausible_spacing(values) -> bool:
    lo, hi = SPACING_RANGE_MM
    return bool(np.all((np.asarray(values) >= lo) & (np.asarray(values) <= hi)))


def _orientation(value) -> np.ndarray | None:
    """Row and column cosines, or None when absent or degenerate (a zero-length or
    parallel pair has no normal: it would become a NaN direction)."""
    arr = _floats(value, 6) if value is not None else None
    if arr is None:
        return None
    row, col = arr[:3], arr[3:]
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-3 or np.linalg.norm(np.cross(row, col)) < 1e-3:
        return None
    return arr


def _invalid(spacing, orientation, between) -> tuple:
    """Names of the geometry attributes that are present but implausible (the stack
    decides whether that refuses the series or is noted)."""
    bad = []
    if spacing is not None and _spacing(spacing) is None:
        bad.append("Pixel Spacing")
    if orientation is not None and _orientation(orientation) is None:
        bad.append("Image Orientation (Patient)")
    sbs = _float(between) if between is not None else None
    if sbs is not None and not _plausible_spacing([sbs]):
        bad.append("Spacing Between Slices")
    return tuple(bad)


def _enhanced_frames(src: SourceFile, ds: Dataset) -> list[Frame]:
    n = int(ds.get("NumberOfFrames") or 1)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    top_slope = _either(_float(ds.get("RescaleSlope")), 1.0)
    top_intercept = _either(_float(ds.get("RescaleIntercept")), 0.0)
    frames = []
    for i in range(n):
        pf = per_frame[i] if i < len(per_frame) else None
        pos = _group(pf, shared, "PlanePositionSequence")
        ori = _group(pf, shared, "PlaneOrientationSequence")
        meas = _group(pf, shared, "PixelMeasuresSequence")
        pvt = _group(pf, shared, "PixelValueTransformationSequence")
        content = _group(pf, shared, "FrameContentSequence")
        echo = _group(pf, shared, "MREchoSequence")
        frames.append(
            Frame(
                source=src,
                ds=ds,
                frame=i,
                position=_floats(pos.get("ImagePositionPatient"), 3) if pos else None,
                orientation=_orientation(ori.get("ImageOrientationPatient")) if ori else None,
                pixel_spacing=_spacing(meas.get("PixelSpacing")) if meas else None,
                slice_thickness=_float(meas.get("SliceThickness")) if meas else None,
                spacing_between_slices=_float(meas.get("SpacingBetweenSlices")) if meas else None,
                invalid=_invalid(
                    meas.get("PixelSpacing") if meas else None,
                    ori.get("ImageOrientationPatient") if ori else None,
                    meas.get("SpacingBetweenSlices") if meas else None,
                ),
                slope=_either(_float(pvt.get("RescaleSlope")) if pvt else None, top_slope),
                intercept=_either(_float(pvt.get("RescaleIntercept")) if pvt else None, top_intercept),
                split=(
                    str(content.get("StackID", "")) if content else "",
                    str(content.get("TemporalPositionIndex", "")) if content else "",
                    str(echo.get("EffectiveEchoTime", "")) if echo else "",
                ),
            )
        )
    return frames
