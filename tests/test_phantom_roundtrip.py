"""Phantom DICOM -> `diffugts ingest` -> the same volume and geometry as the phantom's NIfTI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from diffugts.phantom.case import CaseSpec, generate_case
from diffugts.phantom.cohort import write_case
from diffugts.stages.ingest import ingest


@pytest.mark.parametrize(
    "spec",
    [
        CaseSpec(seed=41, index=0, healthy_fraction=0.0),
        CaseSpec(seed=41, index=1, modality="MR", mr_contrast="T1", healthy_fraction=0.0),
    ],
    ids=["CT", "MR-T1"],
)
def test_ingest_reads_back_the_phantom(spec, tmp_path):
    case = write_case(generate_case(spec), tmp_path / "cases")
    out = tmp_path / "study"
    ingest(case / "dicom", out)
    got = sitk.ReadImage(str(out / "volume.nii"))
    ref = sitk.ReadImage(str(case / "volume.nii"))
    assert got.GetSize() == ref.GetSize()
    assert np.allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert np.allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    assert np.allclose(got.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(got).astype(np.float32), sitk.GetArrayFromImage(ref))
    meta = json.loads((out / "series.json").read_text())
    desc = json.loads((case / "case.json").read_text())
    assert desc["dicom"]["series_uid"] in json.dumps(meta)
