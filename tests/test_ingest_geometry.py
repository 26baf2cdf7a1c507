"""Grouping, splitting, sorting and geometry validation on series with known geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from dicomfactory import write_series
from diffugts.errors import InputError
from diffugts.stages.ingest import ingest


def read_volume(out):
    image = sitk.ReadImage(str(out / "volume.nii"))
    return image, sitk.GetArrayFromImage(image)


def test_shuffled_files_are_sorted_along_the_normal(tmp_path):
    pixels = (np.arange(6)[:, None, None] * 100 + np.zeros((6, 12, 10))).astype(np.int16)
    write_series(tmp_path / "in", pixels=pixels, slope=1, intercept=-1024)
    ingest(tmp_path / "in", tmp_path / "out", show_progress=False)
    image, vol = read_volume(tmp_path / "out")
    # Stored k*100, rescaled by -1024: slice order restored, HU applied.
    np.testing.assert_array_equal(vol[:, 0, 0], np.arange(6) * 100 - 1024)
    assert image.GetSpacing() == pytest.approx((0.7, 0.8, 2.0))  # (columns, rows, slices)
    assert image.GetOrigin() == pytest.approx((-10, -20, 30), abs=1e-4)


def test_flipped_and_coronal_orientations_match_simpleitk(tmp_path):
    for name, ori in {"flipped": (-1, 0, 0, 0, -1, 0), "coronal": (1, 0, 0, 0, 0, -1)}.items():
        files = write_series(tmp_path / name, orientation=ori, modality="MR")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / name)))
        ref = reader.Execute()
        ingest(tmp_path / name, tmp_path / f"{name}-out", rules="permissive", show_progress=False)
        ours, vol = read_volume(tmp_path / f"{name}-out")
        assert len(files) == vol.shape[0]
        np.testing.assert_allclose(ours.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(ours.GetDirection(), ref.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(ours.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        np.testing.assert_array_equal(vol, sitk.GetArrayFromImage(ref))


def test_missing_slice_is_rejected(tmp_path):
    positions = [(0, 0, z) for z in (0, 2, 4, 8, 10, 12)]
    write_series(tmp_path / "in", positions=positions)
    with pytest.raises(InputError, match=r"gap of 4.00 mm .* 2.00 mm is typical \(missing slices\?\)"):
        ingest(tmp_path / "in", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out" / "series.json").exists()


def test_small_spacing_jitter_is_accepted(tmp_path):
    positions = [(0, 0, z) for z in (0, 2.01, 3.99, 6.0, 8.02, 10.0)]
    write_series(tmp_path / "in", positions=positions)
    result = ingest(tmp_path / "in", tmp_path / "out", show_progress=False)
    assert result.series["volume"]["spacing_mm"][2] == pytest.approx(2.0, abs=0.02)


def test_duplicate_positions_are_rejected(tmp_path):
    positions = [(0, 0, z) for z in (0, 2, 4, 4, 6, 8)]
    write_series(tmp_path / "in", positions=positions)
    with pytest.raises(InputError, match="share a position"):
        ingest(tmp_path / "in", tmp_path / "out", show_progress=False)


def test_the_same_file_twice_is_harmless(tmp_path):
    files = write_series(tmp_path / "in")
    (tmp_path / "in" / "copy.dcm").write_bytes(files[2].read_bytes())
    result = ingest(tmp_path / "in", tmp_path / "out", show_progress=False)
    assert result.series["volume"]["size_ijk"][2] == 6
    assert any("duplicate instance" in n for n in result.series["notes"])


def test_inconsistent_pixel_spacing_is_rejected(tmp_path):
    def tweak(k, ds):
        if k == 3:
            ds.PixelSpacing = [0.9, 0.7]

    write_series(tmp_path / "in", tweak=tweak)
    with pytest.raises(InputError, match="inconsistent pixel spacing"):
        ingest(tmp_path / "in", tmp_path / "out", show_progress=False)


def test_mixed_matrix_sizes_split_and_the_larger_part_wins(tmp_path):
    uids = dict(study_uid=generate_uid(), series_uid=generate_uid(), frame_uid=generate_uid())
    write_series(tmp_path / "in", n=6, rows=12, cols=10, **uids)
    write_series(tmp_path / "in", n=4, rows=8, cols=8, origin=(0, 0, 100), seed=1, **uids)
    result = ingest(tmp_path / "in", tmp_path / "out", show_progress=False)
    assert result.series["volume"]["size_ijk"] == [10, 12, 6]
    labels = [c["label"] for c in result.series["selection"]["candidates"]]
    # No Series Description in labels: it carries names and MRNs in the wild.
    assert labels == ["series 1.1 (CT, #1, 6 slices)", "series 1.2 (CT, #1, 4 slices)"]


def test_mixed_modalities_in_one_series_are_rejected(tmp_path):
    write_series(tmp_path / "in", tweak=lambda k, ds: setattr(ds, "Modality", "MR" if k % 2 else "CT"))
    with pytest.raises(InputError, match=r"mixes modalities \(CT, MR\)"):
        ingest(tmp_path / "in", tmp_path / "out", show_progress=False)


def test_two_studies_are_not_silently_mixed(tmp_path):
    write_series(tmp_path / "in" / "a")
    write_series(tmp_path / "in" / "b", seed=1)
    with pytest.raises(InputError, match="2 different studies"):
        ingest(tmp_path / "in", tmp_path / "out", show_progress=False)


def test_most_instances_preferred_among_matching_series(tmp_path):
    study = generate_uid()
    write_series(tmp_path / "in" / "short", n=4, study_uid=study, series_number=2)
    write_series(tmp_path / "in" / "long", n=9, study_uid=study, series_number=3, seed=1)
    result = ingest(tmp_path / "in", tmp_path / "out", show_progress=False)
    assert result.series["series_number"] == 3


def bright_point(n=9, rows=16, cols=16, at=(4, 8, 8)):
    pixels = np.zeros((n, rows, cols), np.int16)
    pixels[at] = 1000
    return pixels


def world_of_max(out):
    image, vol = read_volume(out)
    k, j, i = np.unravel_index(np.argmax(vol), vol.shape)
    return np.array(image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))), image


def test_gantry_tilt_rejected_or_resampled(tmp_path):
    # 20 degree tilt: each slice shifts 2 * tan(20 deg) mm along y.
    shift = 2.0 * np.tan(np.radians(20))
    positions = [(0.0, k * shift, 2.0 * k) for k in range(9)]
    write_series(
        tmp_path / "in",
        n=9,
        rows=16,
        cols=16,
        pixel_spacing=(1, 1),
        positions=positions,
        pixels=bright_point(),
        intercept=0,
    )
    with pytest.raises(InputError, match=r"gantry tilt of 20.0 deg"):
        ingest(tmp_path / "in", tmp_path / "out", show_progress=False)

    result = ingest(tmp_path / "in", tmp_path / "out", resample_grid=True, show_progress=False)
    point, image = world_of_max(tmp_path / "out")
    # The bright voxel sits at column 8, row 8 of slice 4 in the stored (sheared) grid.
    expected = np.array([8.0, 8.0 + 4 * shift, 8.0])
    assert np.linalg.norm(point - expected) <= 1.0  # within a voxel after resampling
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-9)
    assert image.GetSpacing()[2] == pytest.approx(2.0)
    assert result.series["resampled_from"] is not None
    assert any("gantry tilt" in n for n in result.series["notes"])


def test_oblique_rejected_or_resampled_to_axis_aligned(tmp_path):
    a = np.radians(25)
    ori = (np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0)  # axial plane rotated 25 deg
    write_series(
        tmp_path / "in",
        n=9,
        rows=16,
        cols=16,
        pixel_spacing=(1, 1),
        orientation=ori,
        origin=(0, 0, 0),
        pixels=bright_point(),
        intercept=0,
    )
    with pytest.raises(InputError, match=r"oblique orientation \(25.0 deg"):
        ingest(tmp_path / "in", tmp_path / "out", show_progress=False)

    ingest(tmp_path / "in", tmp_path / "out", resample_grid=True, show_progress=False)
    point, image = world_of_max(tmp_path / "out")
    row, col = np.array(ori[:3]), np.array(ori[3:])
    expected = 8 * row + 8 * col + np.array([0, 0, 8.0])
    assert np.linalg.norm(point - expected) <= 1.5
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-9)


def test_slight_obliquity_is_kept_exactly(tmp_path):
    a = np.radians(3)
    ori = (np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0)
    write_series(tmp_path / "in", orientation=ori)
    ingest(tmp_path / "in", tmp_path / "out", show_progress=False)
    image, _ = read_volume(tmp_path / "out")
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3)[:, 0], ori[:3], atol=1e-6)
    series = json.loads((tmp_path / "out" / "series.json").read_text())
    assert series["resampled_from"] is None
