"""benchmarks/compare_outputs.py: identical output folders pass, a changed voxel, JSON value,
DICOM element or missing file fails; what legitimately differs between two runs does not."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from benchmark_scripts import load_benchmark

co = load_benchmark("compare_outputs")


def _nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=True)


def _dicom(path: Path, pixels: np.ndarray, uid: str, description: str = "lesions") -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.ContentDate, ds.ContentTime = uid[-8:], uid[-4:] + "00"  # differ with the UID: ignored like it
    ds.SeriesDescription = description
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_run(root: Path, run: str = "11111111", uid: str = "1.2.3.4.20260101") -> Path:
    """A tiny output folder in the layout of `make run` (results/, _runs/, a listing)."""
    study = root / "results" / "1.2.826.1" / "report"
    study.mkdir(parents=True)
    stamp = "2026-12-03T14:10:55+00:00" if run == "11111111" else "2026-12-04T09:00:01.25Z"
    _nifti(study / "lesions.nii.gz", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    _dicom(study / "seg.dcm", np.eye(4) * 7, uid)
    (study / "report.json").write_text(
        json.dumps(
            {
                "generated": stamp,
                "lesions": [{"id": 1, "volume_ml": 9.1052}],
                "timings_s": {"total": float(len(str(root)))},
                "out": str(root / "results" / "1.2.826.1"),
            }
        )
    )
    (study / "metrics.json").write_text(json.dumps({"lesions": 1, "report_seconds": len(str(root)) / 10}))
    (study / "report.md").write_text(f"# Report\n- **Generated**: {stamp}\n- 1 lesion\n")
    (study / "picture.png").write_bytes(b"\x89PNG fake")
    runs = root / "results" / "_runs"
    key = hashlib.sha256(str(root).encode()).hexdigest()[:32]  # depends on the root, as sha256(input_uri)
    (runs / f"cohort-{run}").mkdir(parents=True)
    (runs / f"cohort-{run}.json").write_text(
        json.dumps({"run": run, "time": "2026-12-03T14:11:06+00:00", "report": str(root / "results" / "cohort" / run)})
    )
    (runs / f"cohort-{run}" / "listing.json").write_text(
        json.dumps({"run": run, "pending": [{"key": key, "input_uri": str(root / "demo-input" / "studies" / "s1")}]})
    )
    (runs / f"{key}.json").write_text(json.dumps({"key": key, "run": run, "status": "done", "result": str(study)}))
    (root / "results" / "cohort" / run).mkdir(parents=True)
    (root / "results" / "cohort" / run / "cohort.csv").write_text(f"key,source\nabc,{study}\n")
    return root


@pytest.fixture
def pair(tmp_path):
    a = make_run(tmp_path / "first")
    b = make_run(tmp_path / "second-run", run="22222222", uid="1.2.3.4.20261231")
    return a, b


def test_identical_runs_pass(pair, capsys):
    a, b = pair
    kinds: dict[str, int] = {}
    count, lines = co.compare(a, b, kinds)
    assert lines == []
    assert count == 10
    assert kinds == {"nifti": 1, "dicom": 1, "json": 5, "text": 2, "bytes": 1}
    assert co.main([str(a), str(b)]) == 0
    assert "identical" in capsys.readouterr().out


def test_changed_voxel_fails(pair, capsys):
    a, b = pair
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    array[1, 2, 3] += 1e-6
    _nifti(b / "results" / "1.2.826.1" / "report" / "lesions.nii.gz", array)
    assert co.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "DIFF  results/1.2.826.1/report/lesions.nii.gz: 1 of 24 voxels differ" in out


def test_changed_geometry_fails(pair):
    a, b = pair
    _nifti(
        b / "results" / "1.2.826.1" / "report" / "lesions.nii.gz",
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        spacing=(1.0, 1.0, 2.5),
    )
    _, lines = co.compare(a, b)
    assert len(lines) == 1 and "spacing (1.0, 1.0, 2.0) != (1.0, 1.0, 2.5)" in lines[0]


def test_changed_json_value_fails(pair):
    a, b = pair
    path = b / "results" / "1.2.826.1" / "report" / "report.json"
    doc = json.loads(path.read_text())
    doc["lesions"][0]["volume_ml"] = 9.1053
    path.write_text(json.dumps(doc))
    _, lines = co.compare(a, b)
    assert lines == ["DIFF  results/1.2.826.1/report/report.json: /lesions/0/volume_ml: 9.1052 != 9.1053"]


def test_timing_fields_are_dropped_but_nothing_else():
    norm = co.Normaliser(Path("/nowhere"))
    doc = {
        "timings_s": {"a": 1},
        "timings": {"b": 2},
        "stage_timing": {"x_s": 3, "n": 4},
        "report_seconds": 5,
        "when_s": 6,
    }
    assert co.normalise_json(doc, norm) == {"stage_timing": {"n": 4}, "when_s": 6}


def test_changed_dicom_pixel_fails(pair):
    a, b = pair
    _dicom(b / "results" / "1.2.826.1" / "report" / "seg.dcm", np.eye(4) * 8, "1.2.3.4.20261231")
    _, lines = co.compare(a, b)
    assert lines == ["DIFF  results/1.2.826.1/report/seg.dcm: PixelData: pixel data"]


def test_changed_dicom_text_fails(pair):
    a, b = pair
    _dicom(b / "results" / "1.2.826.1" / "report" / "seg.dcm", np.eye(4) * 7, "1.2.3.4.20261231", "other")
    _, lines = co.compare(a, b)
    assert lines == ["DIFF  results/1.2.826.1/report/seg.dcm: SeriesDescription: 'lesions' != 'other'"]


def test_missing_file_fails(pair, capsys):
    a, b = pair
    (b / "results" / "1.2.826.1" / "report" / "picture.png").unlink()
    assert co.main([str(a), str(b)]) == 1
    assert "ONLY-A results/1.2.826.1/report/picture.png" in capsys.readouterr().out


def test_extra_file_fails(pair):
    a, b = pair
    shutil.copy(b / "results" / "1.2.826.1" / "report" / "report.md", b / "results" / "extra.md")
    _, lines = co.compare(a, b)
    assert lines == ["ONLY-B results/extra.md"]


def test_changed_bytes_and_text_fail(pair):
    a, b = pair
    (b / "results" / "1.2.826.1" / "report" / "picture.png").write_bytes(b"\x89PNG fakf")
    (b / "results" / "1.2.826.1" / "report" / "report.md").write_text(
        "# Report\n- **Generated**: 2026-12-03T14:18:55+00:00\n- 2 lesions\n"
    )
    _, lines = co.compare(a, b)
    assert lines == [
        "DIFF  results/1.2.826.1/report/picture.png: bytes differ (first at offset 8)",
        "DIFF  results/1.2.826.1/report/report.md: line 3: '- 1 lesion' != '- 2 lesions'",
    ]


def test_a_path_outside_the_root_is_a_difference(pair):
    a, b = pair
    path = b / "results" / "_runs" / "cohort-22222222.json"
    doc = json.loads(path.read_text())
    doc["report"] = "/elsewhere/results/cohort/22222222"
    path.write_text(json.dumps(doc))
    _, lines = co.compare(a, b)
    # named as in A; the path leaves B's root, so it stays a path
    assert len(lines) == 1 and lines[0].startswith("DIFF  results/_runs/cohort-11111111.json: /report: ")


def test_two_files_and_bad_arguments(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"rows": [1, 2], "timings_s": {"x": 1}}')
    (tmp_path / "b.json").write_text('{"rows": [1, 2], "timings_s": {"x": 2}}')
    (tmp_path / "c.json").write_text('{"rows": [1, 3]}')
    assert co.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert co.main([str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 1
    assert co.main([str(tmp_path / "a.json"), str(tmp_path / "missing")]) == 2
    assert co.main([str(tmp_path / "a.json"), str(tmp_path)]) == 2
    capsys.readouterr()
