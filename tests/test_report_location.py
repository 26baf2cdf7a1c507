"""Lesion sites and PACS slices in the study report (diffugts.stages.report.location): the side of a
paired organ against the body's midline, the source series' Instance Number, the
uncalibrated-confidence note, checked on a phantom whose ground truth names each lesion's side."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from diffugts.artifacts.geometry import Geometry
from diffugts.stages.report import location


def test_side_of_paired_organs_only_and_not_on_the_midline():
    assert location.side("kidney", [60.0, 0, 0], midline_x=0.0) == "left"  # LPS: +x is the patient's left
    assert location.side("kidney", [-60.0, 0, 0], midline_x=0.0) == "right"
    assert location.side("kidney", [5.0, 0, 0], midline_x=0.0) is None
    assert location.side("liver", [60.0, 0, 0], midline_x=0.0) is None
    assert location.site("kidney", "left") == "left kidney" and location.site("liver", None) == "liver"
    assert location.site(None, None) == "-"


def test_midline_follows_the_body_not_the_field_of_view():
    geometry = Geometry(origin=[-100.0, -100.0, 0.0], spacing=[1.0, 1.0, 1.0], direction=np.eye(3), shape=(4, 200, 200))
    volume = np.full(geometry.shape, -1000.0, np.float32)
    volume[:, 50:150, 120:180] = 40.0  # a body lying off-centre: i 120..179 -> x 20..79 mm
    assert location.body_midline_x(volume, geometry, "CT") == pytest.approx(49.5)


@pytest.mark.slow
def test_report_names_the_side_and_the_slice_of_each_kidney_lesion(tmp_path):
    from diffugts.artifacts.study import load_study
    from diffugts.phantom import CaseSpec, generate_case, write_case
    from diffugts.stages.ingest import ingest
    from diffugts.stages.lesions import write_lesion_artifact
    from diffugts.stages.report import make_report

    case = generate_case(CaseSpec(seed=7, index=1, healthy_fraction=0.0, modality="CT", split="seen"))
    truth = [les["organ"] for les in case.lesions]
    assert set(truth) == {"left kidney", "right kidney"}
    case_dir = write_case(case, tmp_path / "cases")
    ingest(case_dir / "dicom", tmp_path / "study", show_progress=False)
    study = load_study(tmp_path / "study")
    kidney = case.lesion_map > 0
    targets = [{"prompt": {"text": "kidney tumor", "organ": "kidney"}, "score": 0.8}]
    write_lesion_artifact(
        tmp_path / "lesions",
        study,
        targets,
        [kidney],
        [kidney.astype(np.float32)],
        min_volume_ml=0.1,
        model={"name": "truth", "sha256": "0" * 64},
    )
    summary = make_report(tmp_path / "study", tmp_path / "lesions", tmp_path / "report", pushgateway="")

    # Each lesion's side is the ground truth's: the phantom's lesion ids are the label values.
    by_z = {}
    for path in (case_dir / "dicom").iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_z[round(float(ds.ImagePositionPatient[2]), 2)] = int(ds.InstanceNumber)
    sites = []
    for les in summary["lesions"]:
        x, y, z = les["centroid_lps_mm"]
        ijk = np.round(np.linalg.solve(study.geometry.matrix, np.array([x, y, z]) - study.geometry.origin))
        label = int(case.lesion_map[int(ijk[2]), int(ijk[1]), int(ijk[0])])
        assert les["site"] == case.lesions[label - 1]["organ"]
        sites.append(les["site"])
        # The slice: the DICOM instance at the z of the lesion's longest axial diameter.
        z_diameter = round(float(les["diameter_endpoints_lps_mm"][0][2]), 2)
        assert les["source_slice"] == f"instance {by_z[z_diameter]}"
    assert set(sites) == {"left kidney", "right kidney"}
    html = (tmp_path / "report" / "report.html").read_text()
    assert "left kidney" in html and "right kidney" in html and "not calibrated" in html
    assert "lesion verifier&#x27;s probability" in html or "lesion verifier's probability" in html
    assert "slice in the source series" in html and "instance " in html
    assert json.loads((tmp_path / "report" / "report.json").read_text())["lesions"][0]["site"].endswith("kidney")


def test_slice_label_without_an_axial_stack():
    slices = location.Slices(SimpleNamespace(root=".", series={"instances": []}))
    assert slices.label({"axial_axis": "i", "diameter_slice": 3}) == "n/a"
    assert slices.label({"axial_axis": "k", "diameter_slice": 3}) == "n/a"
