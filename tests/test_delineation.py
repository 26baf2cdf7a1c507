"""Delineation of verified lesions by level (diffugts.stages.delineation, NormativeParams.delineate_level)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from diffugts.stages.delineation import LevelDelineation, continuation, level_delineated, surround
from diffugts.stages.normative import NormativeParams

SPACING = (4.0, 2.75, 2.75)
SHAPE = (20, 40, 40)


def ball(centre, radius_mm):
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    d2 = ((k - centre[0]) * SPACING[0]) ** 2 + ((j - centre[1]) * SPACING[1]) ** 2 + ((i - centre[2]) * SPACING[2]) ** 2
    return d2 <= radius_mm**2


def scene(lesion_value=0.8, seed=0):
    """A uniform organ (0.5, noisy) filling most of the grid, a 9 mm lesion in it, and the
    relative normative score the candidates were cut from (the lesion well above its seed
    threshold, a halo around it just past the growing one)."""
    rng = np.random.default_rng(seed)
    organ = np.zeros(SHAPE, bool)
    organ[2:-2, 3:-3, 3:-3] = True
    lesion = ball((10, 20, 20), 9.0)
    image = np.where(organ, 0.5, 0.1).astype(np.float32) + rng.normal(0, 0.01, SHAPE).astype(np.float32)
    image[lesion] = lesion_value
    score = np.where(lesion, 2.0, -1.0).astype(np.float32)
    halo = ndimage.binary_dilation(lesion, iterations=2) & organ
    score[halo & ~lesion] = -0.6
    return image, organ, score, lesion, halo


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("lesion_value", [0.8, 0.2])  # brighter or darker than its organ
def test_a_candidate_with_a_halo_is_reported_as_its_lesion(lesion_value):
    image, organ, score, lesion, halo = scene(lesion_value)
    out = level_delineated(halo, image, organ, score, SPACING)
    assert dice(halo, lesion) < 0.6  # the candidate as grown: mostly halo
    assert dice(out, lesion) > 0.95
    assert ndimage.label(out, structure=np.ones((3, 3, 3)))[1] == 1


def test_an_undergrown_candidate_reaches_its_lesion_edge_within_the_expansion():
    image, organ, score, lesion, _ = scene()
    small = ball((10, 20, 20), 4.0)
    out = level_delineated(small, image, organ, score, SPACING, expand_mm=3.0)
    reach = ndimage.distance_transform_edt(~small, sampling=SPACING) <= 3.0
    assert (out & lesion).sum() > (small & lesion).sum()
    assert not (out & ~reach).any()
    assert (level_delineated(small, image, organ, score, SPACING, expand_mm=0.0) <= small).all()


def test_one_reported_lesion_per_candidate_else_the_candidate_whole():
    image, organ, score, _, _ = scene()
    # two foci joined by organ-level tissue in one candidate: the delineation would split it
    image[:] = np.where(organ, 0.5, 0.1)
    a, b = ball((10, 12, 12), 6.0), ball((10, 28, 28), 6.0)
    image[a | b] = 0.8
    score = np.where(a | b, 2.0, -1.0).astype(np.float32)
    bridge = np.zeros(SHAPE, bool)
    bridge[9:12, 12:29, 12:29] = np.eye(17, dtype=bool) | np.eye(17, k=1, dtype=bool)
    candidate = ndimage.binary_dilation(a | b, iterations=1) | bridge
    assert ndimage.label(candidate, structure=np.ones((3, 3, 3)))[1] == 1
    assert np.array_equal(level_delineated(candidate, image, organ, score, SPACING), candidate)


def test_where_the_image_cannot_say_the_candidate_is_kept_whole():
    image, organ, score, lesion, halo = scene()
    no_organ = np.zeros(SHAPE, bool)
    assert np.array_equal(level_delineated(halo, image, no_organ, score, SPACING), halo)
    flat = np.full(SHAPE, 0.5, np.float32)  # no contrast between lesion and organ
    assert np.array_equal(level_delineated(halo, flat, organ, score, SPACING), halo)
    empty = np.zeros(SHAPE, bool)
    assert not level_delineated(empty, image, organ, score, SPACING).any()


def test_each_candidate_is_delineated_on_its_own():
    image, organ, score, lesion, halo = scene()
    far = ball((10, 8, 32), 5.0)
    image[far] = 0.2  # a dark lesion elsewhere, candidate grown past it
    score[far] = 2.0
    far_candidate = ndimage.binary_dilation(far, iterations=1) & organ
    out = level_delineated(halo | far_candidate, image, organ, score, SPACING)
    assert dice(out & halo, lesion) > 0.95 and dice(out & far_candidate, far) > 0.9


def test_params_and_findings_carry_the_delineation():
    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="delineate_level"):
            NormativeParams(delineate_level=bad)
    with pytest.raises(ValueError, match="set one"):
        NormativeParams(delineate_level=0.5, delineate_above=-0.5)
    with pytest.raises(ValueError, match="delineate_expand_mm"):
        NormativeParams(delineate_expand_mm=-1.0)
    old = NormativeParams.from_dict({"components": 2})  # manifests written before it
    assert old.delineate_level is None and old.delineate_expand_mm == 3.0

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    args = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a])  # noqa: E731
    assert (
        args().delineate_level
        == DemoRecipe.normative_delineate_level
        == DemoRecipe().normative_params().delineate_level
    )
    assert args("--delineate-level", "0.5", "--delineate-expand-mm", "0").delineate_level == 0.5
    assert args("--delineate-level", "none").delineate_level is None
    assert args("--delineate-expand-mm", "0").delineate_expand_mm == 0.0

    image, organ, score, lesion, halo = scene()
    by_level = LevelDelineation(image, 0.4, 3.0)
    assert np.array_equal(by_level(halo, organ, score, SPACING), level_delineated(halo, image, organ, score, SPACING))
    assert not np.array_equal(
        replace(by_level, expand_mm=0.0)(ball((10, 20, 20), 4.0), organ, score, SPACING),
        by_level(ball((10, 20, 20), 4.0), organ, score, SPACING),
    )


def test_train_delineation_sets_it_on_a_package_without_refitting(tmp_path, capsys):
    import json

    from diffugts.cli import main
    from diffugts.models.defaults import DEMO_2D_MODEL, DEMO_MODEL
    from diffugts.models.package import open_package

    out = tmp_path / "pkg"
    args = ["train", "delineation", "--model", str(DEMO_MODEL), "--out", str(out)]
    assert main([*args, "--level", "0.5", "--expand-mm", "0"]) == 0
    shipped, made = open_package(DEMO_MODEL), open_package(out)
    assert made.manifest["files"]["normative.safetensors"] == shipped.manifest["files"]["normative.safetensors"]
    params = made.network("normative")["params"]
    assert (params["delineate_level"], params["delineate_expand_mm"]) == (0.5, 0.0)
    assert made.network("normative")["thresholds"] == shipped.network("normative")["thresholds"]
    assert made.manifest["provenance"]["delineation"]["level"] == 0.5
    assert main([*args, "--level", "none"]) == 0
    assert json.loads((out / "manifest.json").read_text())["networks"]["normative"]["params"]["delineate_level"] is None
    capsys.readouterr()
    assert main(["train", "delineation", "--model", str(DEMO_2D_MODEL), "--out", str(tmp_path / "2d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no normative model" in err[0]
    assert not (tmp_path / "2d").exists()
    assert main([*args, "--level", "1.5"]) == 2
    assert "delineate_level" in capsys.readouterr().err


def _tube(axis_centre=(10, 20), radius_mm=4.5):
    """A bright tube along the last axis through the whole grid, in and out of the organ."""
    k, j = np.ogrid[: SHAPE[0], : SHAPE[1]]
    d2 = ((k - axis_centre[0]) * SPACING[0]) ** 2 + ((j - axis_centre[1]) * SPACING[1]) ** 2
    return np.broadcast_to((d2 <= radius_mm**2)[:, :, None], SHAPE)


@pytest.mark.parametrize("lesion_value", [0.8, 0.2])
def test_a_bounded_lesion_does_not_continue_and_a_vessels_piece_does(lesion_value):
    """``continuation``: tissue like a candidate within 10 mm of it, connected to it, over the
    candidate. A lesion in its organ is all there is of its look (about 0); a piece of a vessel
    is part of a longer structure like it, which goes on past the candidate."""
    image, organ, score, lesion, _ = scene(lesion_value)
    labels = lesion.astype(np.int32)
    assert continuation(labels, [1], image, organ, score, SPACING)[0] == pytest.approx(0.0, abs=0.05)
    tube = _tube()
    vessel_image = np.where(organ, 0.5, 0.1).astype(np.float32) + np.random.default_rng(1).normal(0, 0.01, SHAPE)
    vessel_image[tube] = lesion_value
    piece = tube.copy()
    piece[:, :, :17] = piece[:, :, 23:] = False  # 6 voxels (16.5 mm) of the tube
    vessel_score = np.where(piece, 2.0, -1.0).astype(np.float32)
    value = continuation(piece.astype(np.int32), [1], vessel_image, organ, vessel_score, SPACING)[0]
    reach = 1 + 2 * 10.0 / 16.5  # the piece and 10 mm of tube on each side
    assert value == pytest.approx(np.log(reach), abs=0.15)


def test_continuation_is_zero_where_the_image_cannot_say_and_per_candidate():
    image, organ, score, lesion, _ = scene()
    labels = lesion.astype(np.int32)
    assert continuation(labels, [1], image, np.zeros(SHAPE, bool), score, SPACING)[0] == 0.0  # no organ
    flat = np.full(SHAPE, 0.5, np.float32)
    assert continuation(labels, [1], flat, organ, score, SPACING)[0] == 0.0  # no contrast
    # two candidates, each its own value, in the order of ids
    tube = _tube((10, 8), 3.0)
    image[tube] = 0.8
    labels[tube & (np.arange(SHAPE[2]) >= 15)[None, None, :] & (np.arange(SHAPE[2]) < 20)[None, None, :]] = 2
    values = continuation(labels, [2, 1], image, organ, score, SPACING)
    assert values[0] > np.log(2.0) and values[1] == pytest.approx(0.0, abs=0.05)


@pytest.mark.parametrize("lesion_value", [0.8, 0.2])
def test_a_lesion_is_surrounded_by_its_organ_and_a_candidate_on_the_next_organ_is_not(lesion_value):
    """``surround``: the share of the first ring of voxels around a candidate that is like it.
    About 0 for a lesion in its organ; a piece of a vessel touches the vessel at its two ends;
    a candidate on the edge of a larger region of its look (the next organ scored as this one)
    lies along it over much of its ring, however far that region goes on."""
    image, organ, score, lesion, _ = scene(lesion_value)
    assert surround(lesion.astype(np.int32), [1], image, organ, score, SPACING)[0] == pytest.approx(0.0, abs=0.02)
    tube = _tube()
    vessel_image = np.where(organ, 0.5, 0.1).astype(np.float32) + np.random.default_rng(1).normal(0, 0.01, SHAPE)
    vessel_image[tube] = lesion_value
    piece = tube.copy()
    piece[:, :, :17] = piece[:, :, 23:] = False
    vessel_score = np.where(piece, 2.0, -1.0).astype(np.float32)
    on_vessel = surround(piece.astype(np.int32), [1], vessel_image, organ, vessel_score, SPACING)[0]
    assert 0.05 < on_vessel < 0.3  # the tube's two cut faces, among the organ around its sides
    neighbour = np.zeros(SHAPE, bool)
    neighbour[:, :, 30:] = True  # the next organ, of the lesion's look, which the organ map overlaps
    mapped = organ.copy()
    mapped[:, :, 32:] = False
    next_image = np.where(organ, 0.5, 0.1).astype(np.float32) + np.random.default_rng(2).normal(0, 0.01, SHAPE)
    next_image[neighbour] = lesion_value
    edge = ball((10, 20, 30), 6.0) & neighbour & mapped  # a candidate where the map overlaps it
    next_score = np.where(edge, 2.0, -1.0).astype(np.float32)
    on_next = surround(edge.astype(np.int32), [1], next_image, mapped, next_score, SPACING)[0]
    assert on_next > 0.4 and on_next > on_vessel
    # where the image cannot say: 0; two candidates: each its own, in the order of ids
    flat = np.full(SHAPE, 0.5, np.float32)
    assert surround(lesion.astype(np.int32), [1], flat, organ, score, SPACING)[0] == 0.0
    assert surround(lesion.astype(np.int32), [1], image, np.zeros(SHAPE, bool), score, SPACING)[0] == 0.0
    labels = lesion.astype(np.int32) + 2 * edge.astype(np.int32)
    both = surround(
        labels, [2, 1], np.where(neighbour, next_image, image), organ, np.maximum(score, next_score), SPACING
    )
    assert both[0] > 0.4 and both[1] == pytest.approx(0.0, abs=0.05)
