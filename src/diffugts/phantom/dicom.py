"""Write a phantom volume as a DICOM series (CT Image Storage or MR Image Storage).

One file per axial slice, explicit VR little endian, uncompressed. Geometry: identity
orientation (``ImageOrientationPatient`` = 1\\0\\0\\0\\1\\0), ``ImagePositionPatient`` of slice k
= grid origin + k * dz along +z. Instance numbers run head to feet, as most scanners number an
axial series, so readers must sort by position, not by number. UIDs are derived
deterministically from the case identity (``generate_uid(entropy_srcs=...)``).

CT pixels are stored unsigned 12-bit with RescaleIntercept -1024 (the common scanner layout);
MR pixels are stored as they are (no rescale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from diffugts import __version__
from diffugts.phantom.grid import Grid

CT_INTERCEPT = -1024
MR_SEQUENCES = {
    # contrast: scanning sequence, variant, TR ms, TE ms, flip deg, echo train, name
    "T1": (["GR"], ["SP", "SS"], 150.0, 4.6, 70.0, 1, "*fl2d1"),
    "T2": (["SE"], ["SK", "SP"], 3200.0, 90.0, 150.0, 16, "*tse2d1_16"),
}


@dataclass(frozen=True)
class SeriesInfo:
    modality: str  # "CT" or "MR"
    contrast: str | None  # "T1"/"T2" for MR
    uid_key: tuple  # what makes the UIDs unique: (generator version, seed, index, modality..)
    patient_name: str
    patient_id: str
    patient_sex: str
    patient_age: str  # "054Y"
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    accession: str
    description: str


def uids(info: SeriesInfo) -> dict[str, str]:
    key = [str(k) for k in info.uid_key]
    return {
        name: generate_uid(entropy_srcs=["diffugts-phantom", name, *key])
        for name in ("study", "series", "frame_of_reference")
    }


def write_series(folder: Path, image: np.ndarray, grid: Grid, info: SeriesInfo) -> dict:
    """Write ``image`` (z, y, x) to ``folder`` as one file per slice; returns UIDs etc."""
    folder.mkdir(parents=True, exist_ok=True)
    u = uids(info)
    ds = _common(image, grid, info, u)
    nz = image.shape[0]
    origin = np.asarray(grid.origin)
    if info.modality == "CT":
        stored = np.clip(np.rint(image) - CT_INTERCEPT, 0, 4095).astype(np.uint16)
    else:
        stored = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    sop_uids = []
    for k in range(nz):
        inst = nz - k  # instance 1 = most superior slice
        sop = generate_uid(entropy_srcs=["diffugts-phantom", "sop", *map(str, info.uid_key), str(k)])
        pos = origin + np.array([0.0, 0.0, k * grid.spacing[2]])
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = inst
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.SliceLocation = _ds(pos[2])
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"IM{inst:04d}.dcm", enforce_file_format=True)
        sop_uids.append(sop)
    return {
        "study_uid": u["study"],
        "series_uid": u["series"],
        "frame_of_reference_uid": u["frame_of_reference"],
        "sop_class_uid": str(ds.SOPClassUID),
        "instances": nz,
        "patient_id": info.patient_id,
        "patient_name": info.patient_name,
    }


def _ds(v: float) -> str:
    # shortest decimal that round-trips; DS allows 16 characters
    s = repr(float(v))
    s = s[:-2] if s.endswith(".0") else s
    if len(s) > 16:
        s = f"{v:.10g}"
    return s


def _common(image, grid: Grid, info: SeriesInfo, u: dict) -> Dataset:
    ct = info.modality == "CT"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage if ct else MRImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = f"DIFFUGTS_{__version__}"[:16]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    if ct:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    # patient / study (all fictitious)
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = info.patient_sex
    ds.PatientAge = info.patient_age
    ds.PatientIdentityRemoved = "NO"  # nothing to remove: the patient never existed
    ds.StudyInstanceUID = u["study"]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = info.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = info.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = info.accession[-8:]
    ds.AccessionNumber = info.accession
    ds.StudyDescription = "PHANTOM ABDOMEN"
    # series / equipment
    ds.Modality = info.modality
    ds.SeriesInstanceUID = u["series"]
    ds.SeriesNumber = 2 if ct else (3 if info.contrast == "T1" else 4)
    ds.SeriesDescription = info.description
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "diffugts"
    ds.ManufacturerModelName = "procedural phantom"
    ds.SoftwareVersions = f"diffugts {__version__}"
    ds.InstitutionName = "DIFFUGTS DEMO WORLD"
    ds.FrameOfReferenceUID = u["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    # geometry
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[0])]  # row, column spacing
    ds.SliceThickness = _ds(grid.spacing[2])
    ds.SpacingBetweenSlices = _ds(grid.spacing[2])
    # pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(image.shape[1]), int(image.shape[2])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if ct:
        ds.RescaleIntercept = str(CT_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.WindowCenterWidthExplanation = ["ABDOMEN", "LUNG"]
        ds.KVP = "120"
        ds.XRayTubeCurrent = 200
        ds.ConvolutionKernel = "STANDARD"
        ds.ReconstructionDiameter = _ds(grid.spacing[0] * image.shape[2])
        ds.GantryDetectorTilt = "0"
        ds.ScanOptions = "HELICAL MODE"
        ds.ContrastBolusAgent = "IODINATED CONTRAST (PORTAL VENOUS PHASE)"
        ds.ContrastBolusRoute = "IV"
    else:
        assert info.contrast is not None  # an MR series has its contrast (T1 or T2)
        seq, var, tr, te, flip, etl, name = MR_SEQUENCES[info.contrast]
        ds.ScanningSequence = seq
        ds.SequenceVariant = var
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = name
        ds.RepetitionTime = _ds(tr)
        ds.EchoTime = _ds(te)
        ds.EchoTrainLength = etl
        ds.FlipAngle = _ds(flip)
        ds.MagneticFieldStrength = "1.5"
        ds.ImagingFrequency = "63.87"
        ds.ImagedNucleus = "1H"
        vals = image[image > 0]
        lo, hi = np.percentile(vals, [1, 99]) if vals.size else (0, 1)
        ds.WindowCenter = _ds(round(float(lo + hi) / 2))
        ds.WindowWidth = _ds(max(round(float(hi - lo)), 1))
    return ds
