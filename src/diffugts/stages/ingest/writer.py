"""Writing the study artifact: volume, header copies, rejections, then series.json last."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from diffugts.artifacts import study as artifact
from diffugts.stages.ingest.headers import Frame
from diffugts.stages.ingest.stacks import Stack
from diffugts.utils import atomic

if TYPE_CHECKING:
    from diffugts.stages.ingest import LoadedSeries

# Pixel-bearing elements dropped from the header copies.
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
PIXEL_TAG_LE = bytes.fromhex("e07f1000")
PIXEL_TAG_BE = bytes.fromhex("7fe00010")
NIFTI_HEADER_BYTES = 352  # NIfTI-1 header + extension flag, before the voxels


def write_study(out_dir: Path, loaded: LoadedSeries) -> None:
    stack = loaded.stack
    with atomic.staging_dir(out_dir, marker=artifact.MARKER) as stage:
        image = sitk.GetImageFromArray(loaded.volume, isVector=False)
        assert stack.geometry is not None  # a loaded series has its grid
        stack.geometry.to_sitk(image)
        # Uncompressed .nii: gzip would cost more than the whole DICOM read on large CTs.
        atomic.reserve(stage / artifact.VOLUME, NIFTI_HEADER_BYTES + loaded.volume.nbytes)
        try:
            sitk.WriteImage(image, str(stage / artifact.VOLUME), useCompression=False)
        except RuntimeError as err:
            raise OSError(
                errno.EIO,
                f"SimpleITK could not write {artifact.VOLUME} ({' '.join(str(err).split())[-160:]})",
                str(out_dir / artifact.VOLUME),
            ) from None
        (stage / "headers").mkdir()
        for n, data in enumerate(loaded.headers):
            (stage / header_name(n)).write_bytes(data)
        loaded.series["instances"] = instance_list(stack)
        atomic.write_json(stage / artifact.REJECTIONS, {"rejections": loaded.rejections})
        atomic.write_json(stage / artifact.MARKER, loaded.series)


def header_name(n: int) -> str:
    return f"headers/{n:05d}.dcm"


def _file_order(stack: Stack) -> dict[int, int]:
    """Source files numbered in order of first use by the volume's slices."""
    order: dict[int, int] = {}
    for f in stack.frames:
        order.setdefault(id(f.ds), len(order))
    return order


def instance_list(stack: Stack) -> list[dict]:
    order = _file_order(stack)
    return [
        {
            "slice": k,
            "sop_instance_uid": str(f.ds.get("SOPInstanceUID", "")),
            "sop_class_uid": str(f.ds.get("SOPClassUID", "")),
            "frame_number": None if f.frame is None else f.frame + 1,  # DICOM frames count from 1
            "position_lps_mm": None if f.position is None else [round(float(v), 6) for v in f.position],
            "file": f.source.name,
            "header": header_name(order[id(f.ds)]),
        }
        for k, f in enumerate(stack.frames)
    ]


def header_copies(stack: Stack) -> list[bytes]:
    """Header-only copy of each source file of the stack, in first-use order."""
    first: dict[int, Frame] = {}
    for f in stack.frames:
        first.setdefault(id(f.ds), f)
    return [_header_bytes(f) for f in first.values()]


def _header_bytes(f: Frame) -> bytes:
    """Everything before the Pixel Data element, copied byte for byte when possible.

    A byte copy is ~50x faster than re-encoding with pydicom (0.6 s per 300 slices) and
    keeps the header exactly as the modality wrote it. Deflated files, and elements that
    do not sit where the header says, fall back to pydicom.
    """
    ds = f.ds
    ts = UID(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    if f.pixel_offset is not None and ts != DeflatedExplicitVRLittleEndian:
        start = f.pixel_offset - (8 if ts.is_implicit_VR else 12)
        with open(f.source.path, "rb") as src:
            head = src.read(max(start, 0))
            tag = src.read(4)
        if start > 0 and tag == (PIXEL_TAG_LE if ts.is_little_endian else PIXEL_TAG_BE):
            return head
    for pixel_tag in PIXEL_TAGS:
        if pixel_tag in ds:
            del ds[pixel_tag]
    if ts.is_compressed or ts == DeflatedExplicitVRLittleEndian:
        # Compressed syntaxes encode the data set as explicit VR little endian; with the
        # pixels gone the copy is exactly that.
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
