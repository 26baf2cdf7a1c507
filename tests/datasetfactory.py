"""Tiny datasets written from phantoms, in each real layout (MSD, nnU-Net v2, KiTS23, DICOM +
DICOM SEG), with the mapping that says what their label values are.

Label values: organs keep the phantom's organ labels (ORGAN_VALUES: all 19 organs, so a
dataset case holds every organ a phantom case does); a lesion gets 20 + 4 * (its type's
index) + (its host organ family's index), so every (type, host) pair has its own value and
the mapping can name both, with the phantom's own prompts. The phantom's own folder
(``diffugts phantom`` layout) is written beside for the phantom path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from diffugts.phantom import LESION_TYPES, ORGANS, CaseSpec, generate_case, prompts, write_case
from diffugts.phantom.labels import ORGAN_BY_NAME

SHAPE = (32, 64, 64)
ORGAN_VALUES = {o.name: o.label for o in ORGANS}
FAMILIES = ("liver", "kidney", "spleen", "pancreas")
HOST = {"liver": "liver", "kidney": "right kidney", "spleen": "spleen", "pancreas": "pancreas"}
TYPES = sorted(LESION_TYPES)
SEEN_TYPES = ("hypodense", "hyperenhancing", "cystic")  # diffugts.phantom.split.SEEN_TYPES


def lesion_value(lesion_type: str, organ: str) -> int:
    family = ORGAN_BY_NAME[organ].family
    return 20 + 4 * TYPES.index(lesion_type) + FAMILIES.index(family)


def mapping_doc(name: str = "phantom-set", modality: str = "CT") -> dict:
    labels = {str(v): {"organ": o} for o, v in ORGAN_VALUES.items()}
    for t in TYPES:
        for f in FAMILIES:
            labels[str(20 + 4 * TYPES.index(t) + FAMILIES.index(f))] = {
                "lesion": t,
                "organ": f,
                "prompts": prompts(t, HOST[f]),
            }
    return {"name": name, "modality": modality, "labels": labels}


def write_mapping(path: Path, **kw) -> Path:
    path.write_text(json.dumps(mapping_doc(**kw)))
    return path


def make_cases(indices, seed: int = 41, organs=("liver", "right kidney", "left kidney"), **spec):
    """Phantom cases whose lesions are each one 26-connected component of their label value
    (so a label map without instance ids holds the same lesions)."""
    out = []
    for i in indices:
        case = generate_case(CaseSpec(seed=seed, index=i, shape=SHAPE, organs=organs, **spec))
        if separable(case):
            out.append(case)
    return out


def label_map(case) -> np.ndarray:
    labels = np.zeros(case.organs.shape, np.uint8)
    for organ, value in ORGAN_VALUES.items():
        labels[case.organs == ORGAN_BY_NAME[organ].label] = value
    for rec in case.lesions:
        labels[case.lesion_map == rec["id"]] = lesion_value(rec["type"], rec["organ"])
    return labels


def separable(case) -> bool:
    labels = label_map(case)
    for value in {lesion_value(r["type"], r["organ"]) for r in case.lesions}:
        recs = sorted(r["voxels"] for r in case.lesions if lesion_value(r["type"], r["organ"]) == value)
        comp, n = ndimage.label(labels == value, structure=np.ones((3, 3, 3), bool))
        if sorted(np.bincount(comp.ravel())[1:].tolist()) != recs:
            return False
    return True


def image(array, case) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(case.grid.spacing)
    img.SetOrigin(case.grid.origin)
    return img


def write_msd(root: Path, cases, name: str = "phantom-set") -> Path:
    """MSD layout: dataset.json with a training list, imagesTr/, labelsTr/."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for case in cases:
        cid = case.spec.case_id
        sitk.WriteImage(image(case.image.astype(np.float32), case), str(root / "imagesTr" / f"{cid}.nii.gz"))
        sitk.WriteImage(image(label_map(case), case), str(root / "labelsTr" / f"{cid}.nii.gz"))
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps({"name": name, "modality": {"0": "CT"}, "numTraining": len(cases), "training": training})
    )
    return root


def write_nnunet(root: Path, cases) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in cases:
        cid = case.spec.case_id
        sitk.WriteImage(image(case.image.astype(np.float32), case), str(root / "imagesTr" / f"{cid}_0000.nii.gz"))
        sitk.WriteImage(image(label_map(case), case), str(root / "labelsTr" / f"{cid}.nii.gz"))
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0},
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
            }
        )
    )
    return root


def write_kits(root: Path, cases) -> Path:
    for n, case in enumerate(cases):
        folder = root / f"case_{n:05d}"
        folder.mkdir(parents=True)
        sitk.WriteImage(image(case.image.astype(np.float32), case), str(folder / "imaging.nii.gz"))
        sitk.WriteImage(image(label_map(case), case), str(folder / "segmentation.nii.gz"))
    return root


def write_phantom_folder(root: Path, cases) -> Path:
    for case in cases:
        write_case(case, root, dicom=False)
    return root


def write_totalsegmentator(root: Path, case_id: str, case, multilabel: bool = False) -> None:
    """A fake TotalSegmentator output from the phantom's organ labels."""
    names = {
        "liver": "liver",
        "right kidney": "kidney_right",
        "left kidney": "kidney_left",
        "spleen": "spleen",
        "pancreas": "pancreas",
        "right lung": "lung_upper_lobe_right",
        "left lung": "lung_upper_lobe_left",
    }
    v2 = {
        "spleen": 1,
        "kidney_right": 2,
        "kidney_left": 3,
        "liver": 5,
        "pancreas": 7,
        "lung_upper_lobe_left": 10,
        "lung_upper_lobe_right": 12,
    }
    if multilabel:
        labels = np.zeros(case.organs.shape, np.uint8)
        for organ, ts in names.items():
            labels[case.organs == ORGAN_BY_NAME[organ].label] = v2[ts]
        root.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image(labels, case), str(root / f"{case_id}.nii.gz"))
        return
    (root / case_id).mkdir(parents=True)
    for organ, ts in names.items():
        mask = (case.organs == ORGAN_BY_NAME[organ].label).astype(np.uint8)
        sitk.WriteImage(image(mask, case), str(root / case_id / f"{ts}.nii.gz"))


def write_dicom_seg(root: Path, cases, overlap: bool = False) -> Path:
    """<root>/<case>/: the phantom's DICOM series and a DICOM SEG (highdicom) of its labels,
    one segment per label value present (segment number = position, labels name the value).
    ``overlap``: organ segments also hold the lesion voxels next to them, as real SEGs often
    do (an organ segment with its tumour inside)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from scipy import ndimage

    from diffugts.phantom.cohort import series_info
    from diffugts.phantom.dicom import write_series

    for case in cases:
        folder = root / case.spec.case_id
        write_series(folder / "series", case.image, case.grid, series_info(case))
        sources = [pydicom.dcmread(p) for p in sorted((folder / "series").glob("*.dcm"))]
        sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        labels = label_map(case)
        values = [int(v) for v in np.unique(labels) if v]
        relabelled = np.zeros(labels.shape, np.uint8)
        channels = np.zeros(labels.shape + (len(values),), np.uint8)
        lesion = labels >= 20  # mapping_doc: lesion values from 20
        descriptions = []
        for number, value in enumerate(values, start=1):
            relabelled[labels == value] = number
            channels[..., number - 1] = labels == value
            if overlap and value < 20:
                channels[..., number - 1] |= lesion & ndimage.binary_dilation(labels == value, iterations=3)
            descriptions.append(
                hd.seg.SegmentDescription(
                    segment_number=number,
                    segment_label=f"value {value}",
                    segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                    segmented_property_type=codes.SCT.Neoplasm,
                    algorithm_type="MANUAL",
                )
            )
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=channels if overlap else relabelled,
            segmentation_type="BINARY",
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=900,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="tests",
            manufacturer_model_name="tests",
            software_versions="0",
            device_serial_number="0",
            omit_empty_frames=True,
        )
        seg.save_as(folder / "seg.dcm")
    return root


def seg_mapping_doc(name: str = "phantom-seg") -> dict:
    """The DICOM SEG mapping: segments named by their label ("value N")."""
    doc = mapping_doc(name)
    doc["labels"] = {f"value {k}": v for k, v in doc["labels"].items()}
    return doc
