"""Lesion instances and measurements against analytic shapes (diffugts.stages.lesions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffugts.artifacts.geometry import Geometry
from diffugts.artifacts.study import Study
from diffugts.stages.lesions import axial_axis, measure, split_instances, write_lesion_artifact


def rotation(axis: str, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    a, b = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[a, a] = r[b, b] = c
    r[a, b], r[b, a] = -s, s
    return r


def grid_around(center, spacing, direction, half_extent_mm=22.0) -> tuple[Geometry, np.ndarray]:
    """A grid with a voxel centre exactly at ``center``, covering +-half_extent_mm."""
    spacing = np.asarray(spacing, float)
    direction = np.asarray(direction, float)
    n = np.ceil(half_extent_mm / spacing).astype(int)  # voxels each side, per (i, j, k)
    origin = np.asarray(center, float) - direction @ (spacing * n)
    shape = tuple(int(v) for v in (2 * n + 1)[::-1])
    return Geometry(origin, spacing, direction, shape), n


def sphere(geometry: Geometry, center, radius) -> np.ndarray:
    k, j, i = np.indices(geometry.shape)
    world = geometry.world(np.stack([i, j, k], axis=-1))
    return np.linalg.norm(world - np.asarray(center), axis=-1) <= radius


CENTER = (12.5, -40.25, -310.0)
GEOMETRIES = {
    "isotropic": ((1.0, 1.0, 1.0), np.eye(3)),
    "anisotropic": ((0.7, 0.7, 3.0), np.eye(3)),
    "phantom": ((2.75, 2.75, 4.0), np.eye(3)),
    "flipped": ((0.8, 0.8, 2.5), np.diag([-1.0, -1.0, -1.0])),
    "oblique": ((0.9, 0.9, 2.0), rotation("z", 25) @ rotation("x", 4)),
    "coronal": ((0.8, 0.8, 2.0), np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])),
    "sagittal": ((1.0, 0.6, 1.5), np.array([[0, 0, -1.0], [1, 0, 0], [0, -1, 0]])),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_sphere_volume_diameter_centroid(name):
    spacing, direction = GEOMETRIES[name]
    radius = 11.93  # off the lattice distances: no boundary ties to break the symmetry
    geometry, _ = grid_around(CENTER, spacing, direction)
    labels = split_instances(sphere(geometry, CENTER, radius), geometry, min_volume_ml=0.1)
    (rec,) = measure(labels, geometry)
    true_ml = 4 / 3 * np.pi * radius**3 / 1000
    assert rec["volume_ml"] == pytest.approx(true_ml, rel=0.03)
    # voxel tolerance: the larger voxel side in the axial plane
    in_plane = [s for n, s in enumerate(spacing) if n != 2 - axial_axis(geometry)]
    assert abs(rec["longest_axial_diameter_mm"] - 2 * radius) <= max(in_plane), rec
    # a sphere centred on a voxel centre is point-symmetric on the lattice: exact centroid
    np.testing.assert_allclose(rec["centroid_lps_mm"], CENTER, atol=0.01)
    # the diameter's end points lie in one axial plane, as far apart as measured (less a voxel)
    a, b = np.array(rec["diameter_endpoints_lps_mm"])
    assert abs(np.linalg.norm(a[:2] - b[:2]) - rec["longest_axial_diameter_mm"]) <= max(in_plane) + 0.01


def test_axial_axis_follows_patient_z():
    assert axial_axis(grid_around(CENTER, *GEOMETRIES["isotropic"])[0]) == 0  # k slices
    assert axial_axis(grid_around(CENTER, *GEOMETRIES["coronal"])[0]) == 1  # j rows
    assert axial_axis(grid_around(CENTER, *GEOMETRIES["sagittal"])[0]) == 1


def test_flipped_grid_gives_identical_measurements():
    spacing = (0.8, 0.8, 2.5)
    plain, _ = grid_around(CENTER, spacing, np.eye(3))
    flipped, _ = grid_around(CENTER, spacing, np.diag([-1.0, 1.0, -1.0]))
    results = []
    for g in (plain, flipped):
        labels = split_instances(sphere(g, (15.0, -38.0, -305.0), 9.0), g)
        (rec,) = measure(labels, g)
        results.append(rec)
    a, b = results
    assert a["voxels"] == b["voxels"]
    assert a["volume_ml"] == b["volume_ml"]
    assert a["longest_axial_diameter_mm"] == pytest.approx(b["longest_axial_diameter_mm"], abs=0.01)
    np.testing.assert_allclose(a["centroid_lps_mm"], b["centroid_lps_mm"], atol=0.01)


def test_ellipsoid_diameter_is_the_long_axis_in_the_axial_plane():
    # semi-axes 15 (x), 6 (y), 25 (z): the axial diameter is 30 mm, not the 50 mm z extent
    g, _ = grid_around(CENTER, (0.7, 0.7, 2.0), rotation("z", 30), half_extent_mm=30)
    k, j, i = np.indices(g.shape)
    d = g.world(np.stack([i, j, k], -1)) - np.asarray(CENTER)
    mask = (d[..., 0] / 15) ** 2 + (d[..., 1] / 6) ** 2 + (d[..., 2] / 25) ** 2 <= 1
    (rec,) = measure(split_instances(mask, g), g)
    assert abs(rec["longest_axial_diameter_mm"] - 30.0) <= 0.7
    a, b = np.array(rec["diameter_endpoints_lps_mm"])
    direction = (b - a)[:2] / np.linalg.norm((b - a)[:2])
    assert abs(direction[0]) > 0.99  # along patient x


def test_single_voxel_and_line():
    g = Geometry((0, 0, 0), (0.5, 0.75, 2.0), np.eye(3), (5, 10, 20))
    mask = np.zeros(g.shape, bool)
    mask[1, 2, 3] = True
    mask[3, 5, 2:12] = True  # a line of 10 voxels along i
    recs = measure(split_instances(mask, g, min_volume_ml=0.0), g)
    assert [r["voxels"] for r in recs] == [10, 1]
    assert recs[0]["longest_axial_diameter_mm"] == pytest.approx(10 * 0.5)
    assert recs[1]["longest_axial_diameter_mm"] == pytest.approx(0.5)


def test_min_volume_and_instance_order():
    g = Geometry((10, 20, 30), (2.0, 2.0, 2.0), np.eye(3), (20, 30, 40))  # 0.008 mL voxels
    mask = np.zeros(g.shape, bool)
    mask[2:4, 2:4, 2:5] = True  # 12 voxels = 0.096 mL: below 0.1
    mask[8:12, 5:9, 5:9] = True  # 64 voxels: second
    mask[2:8, 15:25, 20:30] = True  # 600 voxels: first
    mask[14:17, 20:23, 5:8] = True  # 27 voxels: third
    mask[17, 23, 8] = True  # touches the previous at a corner: 26-connected, 28 voxels
    labels = split_instances(mask, g, min_volume_ml=0.1)
    assert labels.dtype == np.uint16
    recs = measure(labels, g)
    assert [r["id"] for r in recs] == [1, 2, 3]
    assert [r["voxels"] for r in recs] == [600, 64, 28]
    assert labels[5, 20, 25] == 1 and labels[9, 6, 6] == 2 and labels[17, 23, 8] == 3
    assert labels[3, 3, 3] == 0
    assert recs[0]["bbox_kji"] == [[2, 8], [15, 25], [20, 30]]
    assert recs[0]["volume_ml"] == pytest.approx(600 * 0.008)
    assert split_instances(mask, g, min_volume_ml=0.0).max() == 4
    assert split_instances(np.zeros(g.shape, bool), g).max() == 0


def test_centroid_intensity_confidence_analytic():
    direction = rotation("z", 30) @ rotation("y", 3)
    g = Geometry((-100.0, 50.0, -400.0), (0.9, 1.1, 3.0), direction, (10, 20, 30))
    mask = np.zeros(g.shape, bool)
    mask[2:6, 4:10, 10:20] = True  # index box centre (i, j, k) = (14.5, 6.5, 3.5)
    volume = np.full(g.shape, -1000.0, np.float32)
    volume[mask] = np.tile([40.0, 60.0], mask.sum() // 2)
    prob = np.where(mask, 0.8, 0.1).astype(np.float32)
    (rec,) = measure(split_instances(mask, g), g, volume, prob, "HU")
    expected = np.array([-100.0, 50.0, -400.0]) + direction @ (np.array([0.9, 1.1, 3.0]) * [14.5, 6.5, 3.5])
    np.testing.assert_allclose(rec["centroid_lps_mm"], expected, atol=0.006)
    assert rec["mean_intensity"] == pytest.approx(50.0)
    assert rec["intensity_units"] == "HU"
    assert rec["confidence"] == pytest.approx(0.8)


def test_write_lesion_artifact(tmp_path: Path):
    g = Geometry((-50.0, -60.0, -200.0), (1.5, 1.5, 3.0), np.diag([1.0, -1.0, 1.0]), (12, 40, 40))
    volume = np.zeros(g.shape, np.float32)
    study = Study(tmp_path / "study", {"modality": "CT", "volume": {"units": "HU"}}, volume, g)
    liver = np.zeros(g.shape, bool)
    liver[2:6, 5:15, 5:15] = True  # 400 voxels
    liver[8:10, 30:33, 30:33] = True  # 18
    kidney = np.zeros(g.shape, bool)
    kidney[2:5, 10:14, 10:14] = True  # overlaps the first liver lesion
    targets = [
        {"prompt": {"text": "liver tumor", "organ": "liver"}, "score": 0.9},
        {"prompt": {"text": "Kidney cyst!", "organ": "kidney"}, "score": 0.4},
    ]
    out = tmp_path / "lesions"
    summary = write_lesion_artifact(
        out, study, targets, [liver, kidney], min_volume_ml=0.05, model={"name": "demo", "sha256": "0" * 64}
    )
    on_disk = json.loads((out / "lesions.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["stage"] == "refine" and on_disk["min_volume_ml"] == 0.05
    assert [t["lesion_ids"] for t in on_disk["targets"]] == [[1, 2], [3]]
    assert [t["mask"] for t in on_disk["targets"]] == ["masks/00-liver-tumor.nii.gz", "masks/01-kidney-cyst.nii.gz"]
    got = [(les["id"], les["target"], les["voxels"]) for les in on_disk["lesions"]]
    assert got == [(1, 0, 400), (2, 0, 18), (3, 1, 48)]
    image = sitk.ReadImage(str(out / "instances.nii.gz"))
    assert Geometry.from_sitk(image).allclose(g)
    inst = sitk.GetArrayFromImage(image)
    assert inst.dtype == np.uint16
    assert inst[3, 12, 12] == 1  # overlap: the earlier target keeps the voxel
    assert inst[9, 31, 31] == 2
    kidney_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "masks/01-kidney-cyst.nii.gz")))
    assert (kidney_mask.astype(bool) == kidney).all()
