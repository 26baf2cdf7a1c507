"""The pseudo-healthy volume as a derived DICOM series, so a viewer can page through it
next to the original (same frame of reference, same slice positions, new series).

Each slice is the source slice's header copy with new UIDs, ImageType DERIVED\\SECONDARY,
a Source Image Sequence pointing at the original slice, and the synthesised pixels (16-bit
signed, rescale 1 / 0: CT stays in HU). Only possible when the study grid *is* the source
slices: single-frame, not resampled; otherwise skipped with a note.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from diffugts import __version__
from diffugts.artifacts.study import Study
from diffugts.stages.report.seg import uid

SERIES_NUMBER = 903
# Attributes of the source that would describe the original pixels or acquisition
# wrongly once the pixels are replaced.
_DROP = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "RedPaletteColorLookupTableDescriptor",
    "ReferencedImageSequence",
    "IconImageSequence",
    "RescaleType",
    "ModalityLUTSequence",
    "VOILUTSequence",
)


def derived_possible(study: Study) -> str | None:
    """None if the series can be written, else why not."""
    if study.series.get("resampled_from"):
        return "the study was resampled: its grid is not the source slices"
    instances = study.series.get("instances", [])
    if len(instances) != study.geometry.shape[0] or any(i.get("frame_number") for i in instances):
        return "multi-frame source: a derived series needs one source file per slice"
    return None


def write_pseudo_healthy_series(
    out_dir: Path, study: Study, pseudo_healthy: np.ndarray, model: dict, entropy: list[str]
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = uid(entropy, "pseudo-healthy-series")
    description = f"pseudo-healthy synthesis, diffugts {__version__}, model {model.get('name', 'unknown')}"
    stored = np.clip(np.rint(pseudo_healthy), -32768, 32767).astype("<i2")
    paths = []
    for k, inst in enumerate(study.series["instances"]):
        src = pydicom.dcmread(study.root / inst["header"])
        ds = _derived(src, stored[k], series_uid, uid(entropy, f"pseudo-healthy-{k}"), description, k + 1)
        path = out_dir / f"{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _derived(src: Dataset, pixels: np.ndarray, series_uid: str, sop_uid: str, description: str, number: int) -> Dataset:
    ds = copy.deepcopy(src)
    for name in _DROP:
        if name in ds:
            delattr(ds, name)
    for tag in [t for t in ds.keys() if t.is_private]:
        del ds[tag]
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ds.SourceImageSequence = Sequence([ref])
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = SERIES_NUMBER
    ds.InstanceNumber = number
    ds.SeriesDescription = "pseudo-healthy (diffugts)"
    ds.DerivationDescription = description[:1024]
    values = list(src.get("ImageType", []))[2:]
    ds.ImageType = ["DERIVED", "SECONDARY", *values]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if "RescaleSlope" in src or src.get("Modality") == "CT":
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
