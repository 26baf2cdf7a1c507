"""DICOM Segmentation (BINARY) of the lesions, in the source series' frame of reference.

One segment per lesion (not per prompt): the SR's measurement groups then reference
exactly the voxels they measured, and OHIF / Slicer list the lesions one by one. Each
segment carries its prompt (label, algorithm parameters), the finding (Neoplasm, Cyst or
Lesion), the site from the prompt's organ, and a tracking id / UID shared with the SR.

Source images are the study artifact's header-only copies: highdicom needs their
attributes (patient, study, frame of reference, geometry), never their pixels. The mask is
handed over as a ``highdicom.Volume`` carrying the study grid's affine, so frames land at
the source slices' positions (and reference them); a resampled study (gantry tilt,
oblique) gets its own plane positions in the same frame of reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from diffugts import __version__
from diffugts.artifacts.study import Study
from diffugts.stages.report import codes

if TYPE_CHECKING:
    from diffugts.artifacts.lesions import LesionMask

log = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 901
MANUFACTURER = "diffugts"
# Display colours (CIELab via RGB), cycled over lesions: saturated, so outlines stand out
# on grey-scale images in the report and in viewers.
_PALETTE = [
    (230, 41, 41),
    (255, 150, 0),
    (60, 200, 60),
    (230, 60, 230),
    (250, 220, 0),
    (70, 160, 255),
    (255, 110, 160),
    (150, 230, 90),
    (180, 120, 255),
]


def lesion_colour(n: int) -> tuple[int, int, int]:
    return _PALETTE[n % len(_PALETTE)]


@dataclass
class SegmentInfo:
    lesion_id: int
    segment_number: int
    label: str
    tracking_id: str
    tracking_uid: str
    target_index: int


def uid(entropy: list[str], role: str) -> str:
    """Deterministic UID: the same inputs give the same UIDs on a re-run (an upload then
    replaces the same instances), any change of input gives new ones."""
    return generate_uid(entropy_srcs=[*entropy, role])


# Type 2 patient / study attributes highdicom copies from the source (present, maybe empty);
# some scanners and anonymisers leave them out altogether.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)


def source_images(study: Study) -> list[pydicom.Dataset]:
    """The header copies, one per source file, in slice order (missing Type 2 patient and
    study attributes added empty, in memory)."""
    seen: set[str] = set()
    out: list[pydicom.Dataset] = []
    for inst in study.series["instances"]:
        if inst["header"] not in seen:
            seen.add(inst["header"])
            ds = pydicom.dcmread(study.root / inst["header"])
            for keyword in _TYPE2:
                if keyword not in ds:
                    setattr(ds, keyword, None)
            out.append(ds)
    return out


def hd_volume(array: np.ndarray, study: Study, k0: int = 0, channels: dict | None = None) -> hd.Volume:
    """Wrap a (k, j, i[, c]) array that starts at slice ``k0`` of the study grid."""
    g = study.geometry
    m = g.matrix
    affine = np.eye(4)
    affine[:3, :3] = m[:, ::-1]  # highdicom: array axes (k, j, i) -> columns
    affine[:3, 3] = g.world([0, 0, k0])
    return hd.Volume(
        array, affine, "PATIENT", frame_of_reference_uid=study.series["frame_of_reference_uid"], channels=channels
    )


def segment_infos(lesions: list[dict], targets: list[dict], entropy: list[str]) -> list[SegmentInfo]:
    out = []
    for n, rec in enumerate(sorted(lesions, key=lambda r: r["id"]), start=1):
        text = targets[rec["target"]]["prompt"]["text"]
        out.append(
            SegmentInfo(
                lesion_id=rec["id"],
                segment_number=n,
                label=f"lesion {rec['id']}: {text}"[:64],
                tracking_id=f"lesion {rec['id']}",
                tracking_uid=uid(entropy, f"tracking-{rec['id']}"),
                target_index=rec["target"],
            )
        )
    return out


def build_seg(
    study: Study,
    sources: list[pydicom.Dataset],
    masks: dict[int, LesionMask],
    infos: list[SegmentInfo],
    targets: list[dict],
    model: dict,
    entropy: list[str],
) -> hd.seg.Segmentation:
    """The Segmentation dataset; ``masks`` maps lesion id -> its LesionMask."""
    algo_params = {"model": str(model.get("name", "unknown")), "model_sha256": str(model.get("sha256", ""))}
    descriptions = []
    for info in infos:
        prompt = targets[info.target_index]["prompt"]
        site = codes.site_code(prompt.get("organ"))
        algo = hd.AlgorithmIdentificationSequence(
            name="diffugts",
            family=codes.ALGORITHM_FAMILY,
            version=__version__,
            parameters={**algo_params, "prompt": prompt["text"][:64]},
        )
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=info.segment_number,
                segment_label=info.label,
                segmented_property_category=codes.MORPHOLOGICALLY_ABNORMAL,
                segmented_property_type=codes.finding_code(prompt["text"]),
                algorithm_type="AUTOMATIC",
                algorithm_identification=algo,
                tracking_id=info.tracking_id,
                tracking_uid=info.tracking_uid,
                anatomic_regions=[site] if site is not None else None,
                display_color=hd.color.CIELabColor.from_rgb(*lesion_colour(info.segment_number - 1)),
            )
        )
    array, k0 = _pixel_array([masks[i.lesion_id] for i in infos], study.geometry.shape)
    channels = {"SegmentNumber": [i.segment_number for i in infos]} if array.ndim == 4 else None
    volume = hd_volume(array, study, k0, channels)
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=volume,
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=uid(entropy, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uid(entropy, "seg-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="diffugts",
        software_versions=__version__,
        device_serial_number=str(model.get("sha256", "0"))[:16] or "0",
        content_label="LESIONS",
        content_description="DiffuGTS zero-shot tumour segmentation",
        series_description="diffugts lesions",
        omit_empty_frames=True,
    )


def _pixel_array(masks: list, shape) -> tuple[np.ndarray, int]:
    """Label map (k, j, i) when lesions do not overlap, else stacked (k, j, i, n); only the
    slices holding lesions (frames outside are empty and omitted anyway). ``masks``:
    :class:`~diffugts.artifacts.lesions.LesionMask` in segment order."""
    k0 = min(m.box[0].start for m in masks)
    k1 = max(m.box[0].stop for m in masks)
    labels = np.zeros((k1 - k0, *shape[1:]), np.uint16)
    overlap = False
    for n, m in enumerate(masks, start=1):
        region = labels[(slice(m.box[0].start - k0, m.box[0].stop - k0), *m.box[1:])]  # a view
        overlap |= bool(region[m.mask].any())
        region[m.mask] = n
    if not overlap:
        return labels, k0
    stack = np.zeros((*labels.shape, len(masks)), np.uint8)
    for n, m in enumerate(masks):
        m.paint(stack[..., n], 1, k0)
    return stack, k0
