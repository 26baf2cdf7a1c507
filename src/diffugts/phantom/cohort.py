"""Write cases to disk and generate whole cohorts.

A case directory ``<out>/phantom_<seed>_<index>/`` holds::

    dicom/IM0001.dcm ...   the DICOM series (what a user would feed to ``diffugts ingest``)
    volume.nii             float32 image (HU for CT), same LPS geometry as the DICOM
    organs.nii.gz          uint8 organ labels (see case.json "organs")
    lesions.nii.gz         uint16 lesion ids (see case.json "lesions")
    case.json              the description; written last: a case is complete iff it exists

Everything is assembled in a staging directory and moved into place at the end.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from diffugts.phantom.case import GENERATOR_VERSION, Case, CaseSpec, generate_case, organ_table
from diffugts.phantom.dicom import SeriesInfo, write_series
from diffugts.utils.atomic import staging_dir, write_json

MARKER = "case.json"


def series_info(case: Case) -> SeriesInfo:
    s = case.spec
    rng = np.random.default_rng([s.seed, s.index, 0xD1C])  # cosmetic patient details only
    date = dt.date(2020, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
    desc = "ABD PV 4MM PHANTOM" if s.modality == "CT" else f"AX {s.mr_contrast} PHANTOM"
    return SeriesInfo(
        modality=s.modality,
        contrast=s.mr_contrast,
        uid_key=(
            GENERATOR_VERSION,
            s.seed,
            s.index,
            s.modality,
            s.mr_contrast or "",
            int(s.healthy),
            ",".join(s.lesion_types or ()),
            ",".join(s.organs or ()),
            s.split,
            s.shape,
            s.spacing,
        ),
        patient_name=f"PHANTOM^{s.seed}-{s.index:04d}",
        patient_id=f"PH-{s.seed}-{s.index:04d}",
        patient_sex=case.anatomy.get("sex", "O"),
        patient_age=f"{int(rng.integers(35, 85)):03d}Y",
        study_date=date.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        accession=f"PH{s.seed % 10**6:06d}{s.index:04d}",
        description=desc,
    )


def _image(arr: np.ndarray, case: Case) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(case.grid.spacing)
    img.SetOrigin(case.grid.origin)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def describe(case: Case, dicom_info: dict | None = None) -> dict:
    s = case.spec
    g = case.grid
    return {
        "case_id": s.case_id,
        "generator": "diffugts.phantom",
        "generator_version": GENERATOR_VERSION,
        "seed": s.seed,
        "index": s.index,
        "modality": s.modality,
        "mr_contrast": s.mr_contrast,
        "phase": "portal venous" if s.modality == "CT" else None,
        "units": "HU" if s.modality == "CT" else "arbitrary",
        "healthy": not case.lesions,
        "split": _case_split(case),
        "request": {
            "lesion_types": list(s.lesion_types or []),
            "organs": list(s.organs or []),
            "split": s.split,
            "healthy": s.healthy,
        },
        "grid": {
            "shape_zyx": list(g.shape),
            "spacing_xyz": list(g.spacing),
            "origin_lps": list(g.origin),
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
            "coordinates": "DICOM LPS; origin = first slice (lowest z) position",
            "body_frame_offset_lps": list(g.offset),
        },
        "files": {"dicom": "dicom", "volume": "volume.nii", "organs": "organs.nii.gz", "lesions": "lesions.nii.gz"},
        "dicom": dicom_info,
        "organs": organ_table(case),
        "lesions": case.lesions,
        "anatomy": case.anatomy,  # landmarks in mm in the body frame (LPS minus the offset)
    }


def _case_split(case: Case) -> str:
    if not case.lesions:
        return "seen" if case.spec.modality == "CT" else "unseen"
    return "seen" if all(r["split"] == "seen" for r in case.lesions) else "unseen"


def write_case(case: Case, out_root: Path, dicom: bool = True) -> Path:
    final = Path(out_root) / case.spec.case_id
    with staging_dir(final, marker=MARKER) as stage:
        info = None
        if dicom:
            info = write_series(stage / "dicom", case.image, case.grid, series_info(case))
        sitk.WriteImage(_image(case.image.astype(np.float32), case), str(stage / "volume.nii"))
        sitk.WriteImage(_image(case.organs, case), str(stage / "organs.nii.gz"), True)
        sitk.WriteImage(_image(case.lesion_map, case), str(stage / "lesions.nii.gz"), True)
        write_json(stage / MARKER, describe(case, info))
    return final


def generate_cohort(specs, out_root: Path, dicom: bool = True, progress=None) -> list[Path]:
    """Generate and write every spec; ``progress`` is an optional tqdm-like wrapper."""
    out, it = [], (progress(specs) if progress else specs)
    for spec in it:
        out.append(write_case(generate_case(spec), out_root, dicom=dicom))
    return out


def time_generation(spec: CaseSpec, repeats: int = 5) -> float:
    """Median seconds to generate (not write) one case."""
    generate_case(spec)  # warm-up: imports, allocator
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        generate_case(spec)
        times.append(time.perf_counter() - t)
    return float(np.median(times))
