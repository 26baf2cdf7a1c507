"""Small, exact DICOM series for tests: geometry and pixels chosen by the test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_series(
    folder: Path,
    *,
    n: int = 6,
    rows: int = 12,
    cols: int = 10,
    pixel_spacing=(0.8, 0.7),  # DICOM order: between rows, between columns
    thickness: float = 2.0,
    origin=(-10.0, -20.0, 30.0),
    orientation=(1, 0, 0, 0, 1, 0),
    positions=None,
    pixels: np.ndarray | None = None,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_uid: str | None = None,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    series_number: int = 1,
    description: str = "TEST SERIES",
    shuffle: bool = True,
    tweak: Callable[[int, Dataset], None] | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write ``n`` slices; returns the paths in slice order (files are named randomly).

    Positions default to ``origin + k * thickness * normal``. ``pixels`` (n, rows, cols)
    are stored values (int16); ``tweak(k, ds)`` may edit each dataset before it is saved.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    ori = np.asarray(orientation, dtype=float)
    normal = np.cross(ori[:3], ori[3:])
    if positions is None:
        positions = [np.asarray(origin, float) + k * thickness * normal for k in range(n)]
    if pixels is None:
        pixels = np.arange(n * rows * cols, dtype=np.int16).reshape(n, rows, cols) % 2000
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.ImageType = modality, list(image_type)
        ds.PatientName, ds.PatientID = "TEST^PATIENT", "TEST-1"
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, k + 1, description
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        if modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(pixels[k], dtype="<i2").tobytes()
        if tweak:
            tweak(k, ds)
        name = f"{rng.integers(1 << 40):012x}.dcm" if shuffle else f"{k:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
