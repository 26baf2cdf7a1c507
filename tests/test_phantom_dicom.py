"""Phantom cases on disk: DICOM tags and geometry, NIfTI, case.json, dciodvfy, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from diffugts.cli import main
from diffugts.phantom.case import CaseSpec, generate_case
from diffugts.phantom.cohort import MARKER, write_case
from diffugts.phantom.montage import write_montage

CT_SPEC = CaseSpec(seed=31, index=0, lesion_types=("hypodense", "cystic"), healthy_fraction=0.0)
MR_SPEC = CaseSpec(seed=31, index=1, modality="MR", mr_contrast="T2", healthy_fraction=0.0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    return {s.modality: write_case(generate_case(s), root) for s in (CT_SPEC, MR_SPEC)}


def _series(folder: Path):
    files = sorted((folder / "dicom").glob("*.dcm"))
    return files, [pydicom.dcmread(f) for f in files]


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "dicom")))
    return reader.Execute()


def test_case_folder_is_complete(written):
    for case in written.values():
        names = {p.name for p in case.iterdir()}
        assert names == {"dicom", "volume.nii", "organs.nii.gz", "lesions.nii.gz", MARKER}
        assert len(list((case / "dicom").glob("*.dcm"))) == 64
        leftovers = [p for p in case.parent.iterdir() if p.name.startswith(".")]
        assert leftovers == []  # no staging directories left behind


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_dicom_tags(written, modality):
    files, dss = _series(written[modality])
    desc = json.loads((written[modality] / MARKER).read_text())
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    assert {ds.SOPClassUID for ds in dss} == {sop_class}
    assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert len({getattr(ds, key) for ds in dss}) == 1, key
    ds = dss[0]
    assert ds.StudyInstanceUID == desc["dicom"]["study_uid"]
    assert ds.SeriesInstanceUID == desc["dicom"]["series_uid"]
    assert str(ds.PatientName).startswith("PHANTOM^") and ds.Modality == modality
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == [2.75, 2.75]
    assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 4.0
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (128, 128, 16)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    z = sorted(float(d.ImagePositionPatient[2]) for d in dss)
    assert np.allclose(np.diff(z), 4.0)
    assert np.allclose(
        [float(v) for v in min(dss, key=lambda d: float(d.ImagePositionPatient[2])).ImagePositionPatient],
        desc["grid"]["origin_lps"],
    )
    top = max(dss, key=lambda d: float(d.ImagePositionPatient[2]))
    assert top.InstanceNumber == 1  # numbered head to feet, like a scanner
    if modality == "CT":
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert ds.WindowCenter and ds.WindowWidth and ds.ContrastBolusAgent
    else:
        assert "RescaleIntercept" not in ds and ds.EchoTime and ds.RepetitionTime
        assert ds.SeriesDescription.startswith("AX T2")


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_series_geometry_and_voxels_equal_nifti(written, modality):
    case = written[modality]
    series = _read_series(case)
    nii = sitk.ReadImage(str(case / "volume.nii"))
    assert nii.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(series.GetOrigin(), nii.GetOrigin(), atol=1e-4)
    assert np.allclose(series.GetSpacing(), nii.GetSpacing(), atol=1e-5)
    assert np.allclose(series.GetDirection(), nii.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(series).astype(np.float32), sitk.GetArrayFromImage(nii))
    for name, pid in (("organs.nii.gz", sitk.sitkUInt8), ("lesions.nii.gz", sitk.sitkUInt16)):
        lab = sitk.ReadImage(str(case / name))
        assert lab.GetPixelID() == pid
        assert lab.GetSize() == nii.GetSize()
        assert np.allclose(lab.GetOrigin(), nii.GetOrigin(), atol=1e-4)


def test_pydicom_pixels_are_hu(written):
    files, dss = _series(written["CT"])
    nii = sitk.GetArrayFromImage(sitk.ReadImage(str(written["CT"] / "volume.nii")))
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    assert np.array_equal(vol.astype(np.float32), nii)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_case_json_matches_label_maps(written, modality):
    case = written[modality]
    desc = json.loads((case / MARKER).read_text())
    organs_img = sitk.ReadImage(str(case / "organs.nii.gz"))
    organs = sitk.GetArrayFromImage(organs_img)
    lesions = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lesions.nii.gz")))
    assert desc["modality"] == modality and desc["generator_version"]
    assert {o["label"] for o in desc["organs"]} >= set(np.unique(organs)) - {0}
    assert {r["id"] for r in desc["lesions"]} == set(np.unique(lesions)) - {0}
    assert desc["lesions"] and not desc["healthy"]
    for r in desc["lesions"]:
        m = lesions == r["id"]
        assert m.sum() == r["voxels"]
        assert np.all(organs[m] == r["organ_label"])
        kji = np.argwhere(m).mean(0)
        cen = organs_img.TransformContinuousIndexToPhysicalPoint(kji[::-1].tolist())
        assert np.allclose(cen, r["centroid_mm"], atol=0.01)
        if modality == "MR":
            assert r["split"] == "unseen" and "modality" in r["unseen_reasons"]


def test_rewriting_is_deterministic_and_uids_differ_between_cases(written, tmp_path):
    again = write_case(generate_case(CT_SPEC), tmp_path)
    a, b = _series(written["CT"])[1], _series(again)[1]
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert all(x.PixelData == y.PixelData for x, y in zip(a, b))
    mr = _series(written["MR"])[1][0]
    assert mr.StudyInstanceUID != a[0].StudyInstanceUID
    assert mr.SOPInstanceUID not in {d.SOPInstanceUID for d in a}


def _dciodvfy():
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy (Debian dicom3tools) is required in CI")
        pytest.skip("dciodvfy not installed")
    return exe


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_dciodvfy_finds_no_errors(written, modality):
    exe = _dciodvfy()
    files = sorted((written[modality] / "dicom").glob("*.dcm"))
    for f in (files[0], files[len(files) // 2]):
        run = subprocess.run([exe, str(f)], capture_output=True, text=True, timeout=60)
        out = run.stdout + run.stderr
        assert ("CTImage" if modality == "CT" else "MRImage") in out
        errors = [line for line in out.splitlines() if line.startswith("Error")]
        assert errors == [], out


def test_cli_writes_cases(tmp_path, capsys):
    out = tmp_path / "cohort"
    rc = main(["-q", "phantom", "--n", "2", "--seed", "5", "--out", str(out), "--modality", "mr", "--no-dicom"])
    assert rc == 0
    cases = sorted(p for p in out.iterdir() if (p / MARKER).exists())
    assert [p.name for p in cases] == ["phantom_5_0000", "phantom_5_0001"]
    contrasts = [json.loads((p / MARKER).read_text())["mr_contrast"] for p in cases]
    assert contrasts == ["T1", "T2"]  # --mr-contrast alternate (default)
    assert not (cases[0] / "dicom").exists()


def test_cli_lesion_filters_and_healthy(tmp_path):
    out = tmp_path / "c"
    assert (
        main(
            [
                "-q",
                "phantom",
                "--n",
                "3",
                "--seed",
                "8",
                "--out",
                str(out),
                "--no-dicom",
                "--lesions",
                "cystic",
                "--organs",
                "left_kidney",
                "--healthy-fraction",
                "0",
            ]
        )
        == 0
    )
    for p in out.iterdir():
        desc = json.loads((p / MARKER).read_text())
        assert desc["lesions"]
        assert {(r["type"], r["organ"]) for r in desc["lesions"]} == {("cystic", "left kidney")}
    assert main(["-q", "phantom", "--n", "1", "--seed", "8", "--out", str(out / "h"), "--no-dicom", "--healthy"]) == 0
    desc = json.loads(next((out / "h").iterdir()).joinpath(MARKER).read_text())
    assert desc["healthy"] and desc["lesions"] == []


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--n", "abc", "--out", "X"], "--n"),
        (["--n", "0", "--out", "X"], "--n"),
        (["--modality", "pet", "--out", "X"], "--modality"),
        (["--lesions", "hypodense,bogus", "--out", "X"], "bogus"),
        (["--organs", "brain", "--out", "X"], "brain"),
        (["--split", "seen", "--modality", "mr", "--out", "X"], "MR"),
        (["--shape", "12x12", "--out", "X"], "--shape"),
        (["--seed", "-1", "--out", "X"], "--seed"),
        ([], "--out"),
    ],
)
def test_cli_bad_arguments_are_one_line_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["phantom", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffugts: error:") and "\n" not in err and needle in err
    assert not (tmp_path / "X").exists()


@pytest.mark.slow
def test_montage_png(tmp_path):
    png = write_montage(tmp_path / "m.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
