"""Ingestion of real DICOM nobody here wrote (pydicom's and pydicom-data's test files),
checked against what SimpleITK reads from the same files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from diffugts.cli import main
from diffugts.errors import InputError
from diffugts.stages.ingest import ingest


def data_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path, f"{name} not found (is pydicom-data installed?)"
    return Path(path)


DICOMDIR_TESTS = data_file("CT_small.dcm").parent / "dicomdirtests"
CT5N = DICOMDIR_TESTS / "98892001" / "CT5N"


def sitk_reference(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def assert_same_as_sitk(out: Path, source: Path) -> sitk.Image:
    ours = sitk.ReadImage(str(out / "volume.nii"))
    ref = sitk_reference(source)
    assert ours.GetSize() == ref.GetSize()
    # NIfTI stores the affine as float32: exact to ~1e-5 mm.
    np.testing.assert_allclose(ours.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ours.GetDirection(), ref.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(ref).astype(np.float32))
    assert ours.GetPixelID() == sitk.sitkFloat32
    return ours


def test_small_ct_series_matches_simpleitk(tmp_path):
    result = ingest(CT5N, tmp_path / "study", show_progress=False)
    out = tmp_path / "study"
    assert_same_as_sitk(out, CT5N)
    series = json.loads((out / "series.json").read_text())
    assert series == result.series
    assert series["modality"] == "CT" and series["orientation"] == "Axial"
    assert series["volume"]["units"] == "HU"
    assert series["volume"]["size_ijk"] == [16, 16, 5]
    # Instances are listed in volume order, ascending along the slice normal (+z here).
    z = [inst["position_lps_mm"][2] for inst in series["instances"]]
    assert z == sorted(z) and len(z) == 5
    # One header-only copy per source instance, readable, without pixel data.
    headers = sorted((out / "headers").iterdir())
    assert len(headers) == 5
    for inst in series["instances"]:
        copy = pydicom.dcmread(out / inst["header"])
        assert "PixelData" not in copy
        assert copy.SOPInstanceUID == inst["sop_instance_uid"]
        assert copy.SeriesInstanceUID == series["series_instance_uid"]
    assert json.loads((out / "rejections.json").read_text()) == {"rejections": []}


def test_study_folder_picks_the_volume_and_explains_the_rest(tmp_path):
    result = ingest(DICOMDIR_TESTS, tmp_path / "study", show_progress=False)
    assert result.series["series_label"].endswith("5 slices)")
    assert_same_as_sitk(tmp_path / "study", CT5N)
    rejections = json.loads((tmp_path / "study" / "rejections.json").read_text())["rejections"]
    by_file = {r["file"]: r for r in rejections if "file" in r}
    assert by_file["README.txt"]["kind"] == "not_dicom"
    assert by_file["DICOMDIR"]["kind"] == "index_file"
    assert "Computed Radiography" in by_file["77654033/CR1/6154"]["reason"]
    series_reasons = [r["reason"] for r in rejections if "series" in r]
    # 77654033/CT2: four slices, one of them 200 mm away from the others.
    assert any("missing slices" in r for r in series_reasons)
    assert any("LOCALIZER" in r for r in series_reasons)
    # Every candidate has a decision, the taken one exactly once.
    candidates = result.series["selection"]["candidates"]
    assert sum(c["taken"] for c in candidates) == 1
    assert all(c["reasons"] for c in candidates if not c["taken"])
    # MR700 holds 7 radial slices of one series: split into one part per orientation.
    parts = [c for c in candidates if "#700," in c["label"]]  # labels name series by number, no description
    assert len(parts) == 7


@pytest.mark.parametrize(
    "name",
    [
        "emri_small.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_big_endian.dcm",
    ],
)
def test_enhanced_multiframe_mr(tmp_path, name):
    source = data_file(name)
    # No plane position / orientation in these files: default rules pass them over ...
    with pytest.raises(InputError, match="orientation Unknown"):
        ingest(source, tmp_path / "default", show_progress=False)
    assert not (tmp_path / "default" / "series.json").exists()
    # ... permissive rules take them, with SimpleITK's convention for the missing grid.
    result = ingest(source, tmp_path / "study", rules="permissive", show_progress=False)
    assert_same_as_sitk(tmp_path / "study", source)
    assert result.series["geometry_known"] is False
    assert [i["frame_number"] for i in result.series["instances"]] == list(range(1, 11))
    assert len(list((tmp_path / "study" / "headers").iterdir())) == 1


def test_enhanced_ct_with_functional_groups(tmp_path):
    source = data_file("eCT_Supplemental.dcm")
    result = ingest(source, tmp_path / "study", rules="permissive", show_progress=False)
    assert_same_as_sitk(tmp_path / "study", source)
    assert result.series["geometry_known"] is True
    assert result.series["volume"]["spacing_mm"] == [0.388672, 0.388672, 10.0]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_single_slice_needs_permissive_rules(tmp_path, name):
    source = data_file(name)
    with pytest.raises(InputError, match="SliceCount 1"):
        ingest(source, tmp_path / "default", show_progress=False)
    ingest(source, tmp_path / "study", rules="permissive", show_progress=False)
    assert_same_as_sitk(tmp_path / "study", source)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_transfer_syntaxes_decode_to_the_same_volume(tmp_path, name):
    ingest(data_file("MR_small.dcm"), tmp_path / "plain", rules="permissive", show_progress=False)
    ingest(data_file(name), tmp_path / "other", rules="permissive", show_progress=False)
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / "volume.nii")))
    other = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "other" / "volume.nii")))
    np.testing.assert_array_equal(plain, other)
    header = pydicom.dcmread(next((tmp_path / "other" / "headers").iterdir()))
    assert header.Rows == 64 and "PixelData" not in header


def test_lossy_jpeg_2000_ct_decodes(tmp_path):
    ingest(data_file("693_J2KI.dcm"), tmp_path / "lossy", rules="permissive", show_progress=False)
    ingest(data_file("693_UNCI.dcm"), tmp_path / "plain", rules="permissive", show_progress=False)
    lossy = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lossy" / "volume.nii")))
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / "volume.nii")))
    assert lossy.shape == plain.shape == (1, 512, 512)
    assert np.abs(lossy - plain).mean() < 20  # lossy, but the same CT slice in HU


def test_truncated_real_file_is_rejected_in_one_line(tmp_path, capsys):
    source = data_file("MR_truncated.dcm")
    code = main(["ingest", str(source), "--out", str(tmp_path / "out"), "--rules", "permissive"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("diffugts: error: ")
    assert str(source) in err[0] and "pixel data truncated" in err[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rejections.json"]
