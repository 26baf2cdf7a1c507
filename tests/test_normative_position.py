"""Where in its organ a voxel lies, as a normative feature (NormativeParams.position), and the
scored border (NormativeParams.margin_mm) as an option of `train normative`."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from scipy import ndimage

from diffugts.stages.normative import POSITION_FEATURES, NormativeParams, appearance_features
from diffugts.train.normative import fit_normative

SPACING = (4.0, 2.75, 2.75)
SHAPE = (24, 48, 48)
USUAL, ELSEWHERE = (12, 14, 16), (12, 34, 32)  # where the healthy dark structure lies / a lesion


def organ(rng, dark_at=None):
    """An ellipsoidal organ (0.5, noisy) holding, if asked, a dark ball (0.3) 7 mm across."""
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    mask = ((k - 12) / 10.0) ** 2 + ((j - 24) / 20.0) ** 2 + ((i - 24) / 20.0) ** 2 <= 1.0
    x = np.where(mask, 0.5, 0.1) + rng.normal(0, 0.01, SHAPE)
    ball = np.zeros(SHAPE, bool)
    if dark_at is not None:
        c = dark_at
        ball = ((k - c[0]) * 4.0) ** 2 + ((j - c[1]) * 2.75) ** 2 + ((i - c[2]) * 2.75) ** 2 <= 7.0**2
        x[ball] = 0.3
    return x.astype(np.float32), mask, ball & mask


def test_position_features_place_each_voxel_in_its_organs_box():
    x, mask, _ = organ(np.random.default_rng(0))
    base = NormativeParams(texture_mm=(2.5,))
    placed = NormativeParams(texture_mm=(2.5,), position=True)
    assert placed.features == base.features + POSITION_FEATURES
    scored, feats = appearance_features(x, mask, SPACING, placed)
    scored_base, feats_base = appearance_features(x, mask, SPACING, base)
    assert np.array_equal(scored, scored_base)
    assert np.array_equal(feats[:, : len(base.features)], feats_base)  # the other columns unchanged
    where = np.nonzero(scored)
    for axis, column in enumerate(feats[:, len(base.features) :].T):
        extent = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        expected = (where[axis] - extent[0]) / (extent[-1] - extent[0])
        assert np.allclose(column, expected) and 0.0 < column.min() < column.max() < 1.0
    # relative to the organ, not the volume: the same organ elsewhere in a larger volume
    pad = ((3, 9), (20, 0), (0, 11))
    big = np.pad(x, pad, constant_values=0.1)
    n = len(base.features)
    assert np.array_equal(appearance_features(big, np.pad(mask, pad), SPACING, placed)[1][:, n:], feats[:, n:])


def test_position_makes_healthy_anatomy_normal_where_it_always_lies():
    """Healthy organs all hold the same dark ball in the same place (as the vena cava lies at
    the liver's back). With position among the features that ball is normal there, and the same
    ball elsewhere in the organ (a lesion) is not; without position both look alike."""
    rng = np.random.default_rng(1)
    found = {}
    for position in (False, True):
        params = NormativeParams(components=4, position=position)
        healthy = [appearance_features(*organ(rng, USUAL)[:2], SPACING, params)[1] for _ in range(8)]
        model = fit_normative({"liver/CT": np.concatenate(healthy)}, params)
        for name, at in (("usual", USUAL), ("elsewhere", ELSEWHERE)):
            x, mask, ball = organ(rng, at)
            cand = model.candidates(x, mask, "liver", "CT", SPACING)
            found[position, name] = (cand & ball).sum() / ball.sum()
    assert found[True, "usual"] <= 0.1 and found[True, "elsewhere"] >= 0.5
    assert found[False, "elsewhere"] <= 0.1  # a shape healthy organs show is normal anywhere


def test_train_normative_margin_and_position_options():
    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a])  # noqa: E731
    args = parse()
    assert args.margin_mm == DemoRecipe.normative_margin_mm == 5.0 and args.position is DemoRecipe.normative_position
    args = parse("--margin-mm", "2.5", "--position")
    assert args.margin_mm == 2.5 and args.position is True
    recipe = DemoRecipe(normative_margin_mm=3.0, normative_position=True).normative_params()
    assert recipe.margin_mm == 3.0 and recipe.position is True
    with pytest.raises(ValueError, match="margin_mm"):
        NormativeParams(margin_mm=-1.0)
    # manifests written before the options: 5 mm border, no position
    old = NormativeParams.from_dict({"components": 2})
    assert old.margin_mm == 5.0 and old.position is False


def test_a_narrower_margin_scores_more_of_the_organ():
    x, mask, _ = organ(np.random.default_rng(2))
    counts = [appearance_features(x, mask, SPACING, NormativeParams(margin_mm=m))[0].sum() for m in (5.0, 3.0, 0.0)]
    assert counts[0] < counts[1] < counts[2] == mask.sum()


def healthy_model_and_lesion():
    """A mixture fitted on eight healthy organs, its parameters, and an organ with a dark ball."""
    rng = np.random.default_rng(3)
    params = NormativeParams(components=4)
    healthy = [appearance_features(*organ(rng)[:2], SPACING, params)[1] for _ in range(8)]
    return fit_normative({"liver/CT": np.concatenate(healthy)}, params), params, organ(rng, ELSEWHERE)


def test_tighter_growth_keeps_the_lesion_and_less_of_the_tissue_around_it():
    """``grow_above`` between the thresholds stops a candidate's growth short of the halo that
    the coarser features (7 mm means, 5.5 mm Hessian) put around a lesion."""
    from dataclasses import replace

    model, params, (x, mask, ball) = healthy_model_and_lesion()
    loose = model.candidates(x, mask, "liver", "CT", SPACING)
    model.params = replace(params, grow_above=-0.5)
    tight = model.candidates(x, mask, "liver", "CT", SPACING)
    assert not (tight & ~loose).any()  # the same seeds, grown less far
    assert (tight & ball).sum() >= 0.8 * (loose & ball).sum() > 0
    assert (tight & ~ball).sum() < (loose & ~ball).sum()
    for bad in (-1.5, 0.0, 0.5):
        with pytest.raises(ValueError, match="grow_above"):
            NormativeParams(grow_above=bad)
    assert NormativeParams.from_dict({"components": 2}).grow_above == -1.0  # models fitted before it


def test_growth_in_steps_from_the_seeds():
    """``hysteresis(steps=k)``: only the voxels above the growing threshold within k
    26-connected steps of an (opened) seed, through such voxels; a strip seeded at both ends
    becomes two candidates; without steps the whole component."""
    from diffugts.stages.normative import hysteresis

    score = np.zeros((3, 5, 30), np.float32)
    score[1, 1:4, :] = 0.5  # a strip above the growing threshold (0.2)
    score[1, 1:4, 0:3] = score[1, 1:4, 27:30] = 1.0  # seeds (above 0.8) at both ends, 3 x 3 each
    whole = hysteresis(score, 0.2, 0.8, in_slices=True)
    assert whole.sum() == 90
    near = hysteresis(score, 0.2, 0.8, in_slices=True, steps=2)
    assert np.array_equal(np.flatnonzero(near[1, 2]), [0, 1, 2, 3, 4, 25, 26, 27, 28, 29])
    assert ndimage.label(near, np.ones((3, 3, 3)))[1] == 2 and not (near & ~whole).any()
    lone = np.zeros_like(score)
    lone[1, 2, 10] = 1.0  # one unlikely voxel is no seed, in steps or not
    assert not hysteresis(lone, 0.2, 0.8, steps=3).any() and not hysteresis(lone, 0.2, 0.8).any()


def test_growth_limited_in_mm_keeps_the_lesion_and_less_around_it():
    """``grow_mm``: the same seeds, grown at most that far (steps of the finest spacing)."""
    from dataclasses import replace

    model, params, (x, mask, ball) = healthy_model_and_lesion()
    loose = model.candidates(x, mask, "liver", "CT", SPACING)
    model.params = replace(params, grow_mm=2 * min(SPACING))
    near = model.candidates(x, mask, "liver", "CT", SPACING)
    assert not (near & ~loose).any()
    assert (near & ball).sum() >= 0.8 * (loose & ball).sum() > 0
    assert (near & ~ball).sum() <= (loose & ~ball).sum()
    for bad in (0.0, -3.0):
        with pytest.raises(ValueError, match="grow_mm"):
            NormativeParams(grow_mm=bad)
    assert NormativeParams.from_dict({"components": 2}).grow_mm is None  # models fitted before it


def test_train_normative_grow_and_delineate_options():
    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a]).grow_above  # noqa: E731
    assert parse() == DemoRecipe.normative_grow_above == DemoRecipe().normative_params().grow_above
    assert parse("--grow-above", "-0.5") == -0.5
    grow = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a]).grow_mm  # noqa: E731
    assert grow() == DemoRecipe.normative_grow_mm == DemoRecipe().normative_params().grow_mm
    assert grow("--grow-mm", "9") == 9.0 and grow("--grow-mm", "none") is None
    delineate = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a]).delineate_above  # noqa: E731
    assert delineate() == DemoRecipe.normative_delineate_above == DemoRecipe().normative_params().delineate_above
    assert delineate("--delineate-above", "-0.5") == -0.5 and delineate("--delineate-above", "none") is None


def test_delineation_is_the_tighter_growth_inside_the_whole_candidates():
    from dataclasses import replace

    model, params, (x, mask, ball) = healthy_model_and_lesion()
    plain = model.findings(x, mask, "liver", "CT", SPACING)
    assert plain.delineation is None
    model.params = replace(params, grow_above=-0.5)
    tight = model.candidates(x, mask, "liver", "CT", SPACING)
    model.params = replace(params, delineate_above=-0.5)
    found = model.findings(x, mask, "liver", "CT", SPACING)
    assert np.array_equal(found.candidates, plain.candidates)  # the verifier's candidates unchanged
    assert np.array_equal(found.delineation, tight) and (found.delineation & ball).any()
    assert found.delineation.sum() < found.candidates.sum()
    with pytest.raises(ValueError, match="delineate_above"):
        NormativeParams(delineate_above=0.0)
    assert NormativeParams.from_dict({"components": 2}).delineate_above is None


def test_findings_carry_the_delineation_by_level_the_params_ask_for():
    from dataclasses import replace

    model, params, (x, mask, ball) = healthy_model_and_lesion()
    assert model.findings(x, mask, "liver", "CT", SPACING).level_delineation is None
    model.params = replace(params, delineate_level=0.5, delineate_expand_mm=0.0)
    found = model.findings(x, mask, "liver", "CT", SPACING)
    assert found.delineation is None and found.level_delineation.image is x
    assert (found.level_delineation.level, found.level_delineation.expand_mm) == (0.5, 0.0)
    reported = found.level_delineation(found.candidates, mask, found.score, SPACING)
    assert (reported & ball).sum() >= 0.9 * (found.candidates & ball).sum() > 0  # the dark ball kept
    assert (reported & ~ball).sum() < (found.candidates & ~ball).sum()  # less of the tissue around it


def test_each_verified_candidate_reports_its_largest_delineated_part():
    from diffugts.stages.normative import delineated

    kept = np.zeros((6, 20, 20), bool)
    kept[1:5, 2:10, 2:10] = True  # one candidate ...
    kept[1:5, 14:18, 14:18] = True  # ... and another
    delineation = np.zeros_like(kept)
    delineation[2:4, 3:5, 3:5] = True  # the first splits into a small part
    delineation[2:4, 6:9, 6:9] = True  # ... and a larger one
    delineation[2:4, 19, 19] = True  # outside every candidate: never reported
    out = delineated(kept, delineation)
    assert out[2:4, 6:9, 6:9].all() and not out[2:4, 3:5, 3:5].any()
    assert not out[1:5, 14:18, 14:18].any()  # nothing delineated: nothing reported
    assert out.sum() == 18 and not delineated(np.zeros_like(kept), delineation).any()


def thin_organ(rng, dark: bool = False):
    """A slab 6 voxels (16.5 mm) across, like a pancreas (0.5, noisy), holding a dark ball (0.3)
    at its centre line if asked."""
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    mask = (k >= 4) & (k < 20) & (j >= 20) & (j < 26) & (i >= 6) & (i < 42)
    x = np.where(mask, 0.5, 0.1) + rng.normal(0, 0.01, SHAPE)
    ball = ((k - 12) * 4.0) ** 2 + ((j - 22.5) * 2.75) ** 2 + ((i - 24) * 2.75) ** 2 <= 7.0**2
    if dark:
        x[ball & mask] = 0.3
    return x.astype(np.float32), mask, ball & mask


def test_min_interior_scores_a_thin_organ_and_its_lesion():
    """The 5 mm margin leaves a 16 mm slab a sliver; with ``min_interior`` 0.5 half of it and
    most of a lesion inside it are scored, and a model fitted so finds the lesion. A thick
    organ is scored as before."""
    rng = np.random.default_rng(7)
    fixed, shared = NormativeParams(components=2), NormativeParams(components=2, min_interior=0.5)
    x, mask, ball = thin_organ(rng, dark=True)
    scored_fixed = appearance_features(x, mask, SPACING, fixed)[0]
    scored = appearance_features(x, mask, SPACING, shared)[0]
    assert scored_fixed.sum() < 0.5 * mask.sum() <= scored.sum()
    assert (scored & ball).sum() >= 1.5 * (scored_fixed & ball).sum()
    healthy = np.concatenate([appearance_features(*thin_organ(rng)[:2], SPACING, shared)[1] for _ in range(6)])
    model = fit_normative({"pancreas/CT": healthy}, shared)
    found = model.candidates(x, mask, "pancreas", "CT", SPACING)
    assert (found & ball).sum() >= 0.5 * (scored & ball).sum() > 0
    x, thick, _ = organ(np.random.default_rng(8))
    assert np.array_equal(
        appearance_features(x, thick, SPACING, fixed)[0], appearance_features(x, thick, SPACING, shared)[0]
    )
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_interior"):
            NormativeParams(min_interior=bad)
    assert NormativeParams.from_dict({"components": 2}).min_interior == 0.0  # models fitted before it


def test_a_partial_refit_keeps_the_other_organs_fit():
    """`train normative --organs`: the refitted families' scorers are the new fit's, every other
    key's the package's own (weights and thresholds), under the new parameters; a change of the
    features or of the kind of score, which the other organs' fit would not match, is refused."""
    from diffugts.stages.normative import NormativeModel
    from diffugts.train.normative import refitted

    rng = np.random.default_rng(9)
    params = NormativeParams(components=2)
    feats = lambda p: np.concatenate([appearance_features(*organ(rng)[:2], SPACING, p)[1] for _ in range(3)])  # noqa: E731
    old = fit_normative({"liver/CT": feats(params), "pancreas/CT": feats(params)}, params)
    shared = NormativeParams(components=2, min_interior=0.5)
    new = fit_normative({"pancreas/CT": feats(shared), "pancreas/MR": feats(shared)}, shared, seed=1)
    merged = refitted(old, new, ("pancreas",))
    assert merged.params == shared and sorted(merged.mixtures) == ["liver/CT", "pancreas/CT", "pancreas/MR"]
    assert merged.mixtures["liver/CT"] is old.mixtures["liver/CT"]
    assert merged.mixtures["pancreas/CT"] is new.mixtures["pancreas/CT"]
    again = NormativeModel.load(merged.entry(), merged.state_dict())
    assert again.entry()["thresholds"]["liver/CT"] == old.entry()["thresholds"]["liver/CT"]
    other = NormativeParams(components=2, texture_mm=(2.5,))
    with pytest.raises(ValueError, match="texture_mm"):
        refitted(old, fit_normative({"pancreas/CT": feats(other)}, other), ("pancreas",))
    # a seed rule would change the kept organs' candidates: refused, naming the flag
    seeds = NormativeParams(components=2, seed_log_odds=3.0)
    with pytest.raises(ValueError, match="--seed-log-odds"):
        refitted(old, fit_normative({"pancreas/CT": feats(seeds)}, seeds), ("pancreas",))
    # a key the model knew and the refit could not fit (too few samples) is not dropped silently
    with pytest.raises(ValueError, match="pancreas/CT"):
        refitted(old, fit_normative({"pancreas/MR": feats(shared)}, shared), ("pancreas",))


def test_border_settings_may_change_only_where_the_kept_organs_are_scored_alike():
    """A partial refit may change the border settings (margin, min_interior) only if every kept
    organ is scored where it was: ``changed_interiors`` names the kept families whose scored
    interior differs on the fitting cases."""
    from diffugts.train.normative import changed_interiors

    _, thin, _ = thin_organ(np.random.default_rng(10))
    _, thick, _ = organ(np.random.default_rng(11))
    grounded = [[("pancreas", thin, thin), ("liver", thick, thick)]]
    fixed, shared = NormativeParams(components=2), NormativeParams(components=2, min_interior=0.5)
    assert changed_interiors(grounded, fixed, shared, SPACING, ["pancreas", "liver"]) == ["pancreas"]
    assert changed_interiors(grounded, fixed, shared, SPACING, ["liver"]) == []  # the pancreas is refitted
    assert changed_interiors(grounded, fixed, fixed, SPACING, ["pancreas"]) == []
    narrower = NormativeParams(components=2, margin_mm=2.5)
    assert changed_interiors(grounded, fixed, narrower, SPACING, ["liver"]) == ["liver"]


def test_train_normative_organs_names_known_families(tmp_path, capsys):
    from diffugts.cli import main
    from diffugts.models.defaults import DEMO_MODEL

    out = tmp_path / "x"
    code = main(
        ["-q", "train", "normative", "--model", str(DEMO_MODEL), "--out", str(out), "--organs", "pancreas,brain"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "brain" in err[0] and not out.exists()


def test_train_normative_min_interior_and_organs_options():
    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a])  # noqa: E731
    args = parse()
    assert args.min_interior == DemoRecipe.normative_min_interior == 0.5 and args.organs is None
    args = parse("--min-interior", "0", "--organs", "pancreas, spleen")
    assert args.min_interior == 0.0 and args.organs == ("pancreas", "spleen")
    assert DemoRecipe(normative_min_interior=0.5).normative_params().min_interior == 0.5
