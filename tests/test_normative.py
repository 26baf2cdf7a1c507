"""The normative model: appearance features, a mixture fitted on healthy organs that hold
vessels, candidates by hysteresis, storage in a package, and its fitting samples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from diffugts.stages.normative import (
    FEATURES,
    Mixture,
    NormativeModel,
    NormativeParams,
    appearance_features,
    hysteresis,
    key,
    normative_of,
)
from diffugts.train.normative import fit_normative

SPACING = (4.0, 2.75, 2.75)
SHAPE = (24, 48, 48)


def organ_with(rng, vessel: bool = True, lesion: bool = False):
    """An ellipsoidal organ (0.5, textured) crossed by a bright tube (a vessel, 0.7) and, if
    asked, holding a dark ball (a lesion, 0.3)."""
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    organ = ((k - 12) / 10.0) ** 2 + ((j - 24) / 20.0) ** 2 + ((i - 24) / 20.0) ** 2 <= 1.0
    x = np.where(organ, 0.5, 0.1) + rng.normal(0, 0.01, SHAPE)
    if vessel:
        j0 = int(rng.integers(22, 30))
        x[((k - 12) ** 2 * 2.0 + (j - j0) ** 2 <= 2.0) & organ] = 0.7  # along i, about 2 voxels wide
    ball = ((k - 13) * 4.0) ** 2 + ((j - 11) * 2.75) ** 2 + ((i - 32) * 2.75) ** 2 <= 7.0**2
    if lesion:
        x[ball & organ] = 0.3
    return x.astype(np.float32), organ, ball & organ


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    feats = [appearance_features(*organ_with(rng)[:2], SPACING)[1] for _ in range(6)]
    return fit_normative({"liver/CT": np.concatenate(feats)}, NormativeParams(components=4))


def test_features_are_scored_in_the_organs_interior_only():
    x, organ, _ = organ_with(np.random.default_rng(1))
    scored, feats = appearance_features(x, organ, SPACING, NormativeParams(margin_mm=5.0))
    assert feats.shape == (int(scored.sum()), len(FEATURES))
    assert scored.sum() < organ.sum() and not (scored & ~organ).any()
    depth = feats[:, FEATURES.index("depth")]
    assert depth.min() >= 0.4  # about 5 mm in from the surface (in cm; the erosion is voxel-discrete)
    assert np.abs(feats[:, FEATURES.index("mean_2.5mm")]).mean() < 3.0  # organ-relative, near 0


def test_features_on_the_organs_box_equal_the_whole_volumes(monkeypatch):
    """Cropping to the organ (stages.deviation.organ_box) changes no number: the same organ
    inside a larger volume of noisy fat gives bit-identical features either way."""
    from diffugts.stages import deviation, normative

    rng = np.random.default_rng(3)
    x, organ, _ = organ_with(rng, lesion=True)
    pad = ((5, 12), (40, 0), (3, 33))  # touches the volume's j edge
    big = np.pad(x, pad, constant_values=0.1) + rng.normal(0, 0.01, np.add(x.shape, np.sum(pad, 1))).astype(np.float32)
    big[tuple(slice(a, a + n) for (a, _), n in zip(pad, x.shape))] = x
    mask = np.pad(organ, pad)
    params = NormativeParams(margin_mm=5.0)
    scored, feats = appearance_features(big, mask, SPACING, params)
    assert np.array_equal(
        scored[tuple(slice(a, a + n) for (a, _), n in zip(pad, x.shape))],
        appearance_features(x, organ, SPACING, params)[0],
    )
    whole = lambda m, spacing, reach: tuple(slice(0, n) for n in m.shape)  # noqa: E731
    monkeypatch.setattr(normative, "organ_box", whole)
    monkeypatch.setattr(deviation, "organ_box", whole)
    scored_whole, feats_whole = appearance_features(big, mask, SPACING, params)
    assert np.array_equal(scored, scored_whole) and np.array_equal(feats, feats_whole)


def test_the_organs_own_vessel_is_normal_and_a_lesion_is_not(model):
    """What |z| could not tell apart: both the vessel and the lesion deviate from the organ's
    median; only the lesion is unlike the healthy organs the model was fitted on."""
    x, organ, lesion = organ_with(np.random.default_rng(7), lesion=True)
    found = model.candidates(x, organ, "liver", "CT", SPACING)
    vessel = (x > 0.65) & organ
    assert (found & lesion).sum() >= 0.3 * lesion.sum()
    assert (found & vessel).sum() <= 0.05 * vessel.sum()
    healthy, organ2, _ = organ_with(np.random.default_rng(8))
    assert model.candidates(healthy, organ2, "liver", "CT", SPACING).sum() <= 0.01 * organ2.sum()


def mosaic_organ(rng, texture: float):
    """organ_with's organ whose lesion ball has the organ's mean but a coarse mosaic texture
    (smooth noise of SD ``texture``; 0: no lesion), as rim-necrotic and mosaic tumours do."""
    x, organ, ball = organ_with(rng)
    mosaic = ndimage.gaussian_filter(rng.normal(0, 1, SHAPE), 0.7)
    x[ball] += texture * (mosaic[ball] - mosaic[ball].mean()) / mosaic[ball].std()
    return x.astype(np.float32), organ, ball


def test_texture_features_find_a_lesion_with_its_organs_mean():
    """Intensity, shape and depth features miss a mosaic lesion whose mean is its organ's more
    often than a model that also reads local texture (``texture_mm``)."""
    plain, textured = NormativeParams(components=4), NormativeParams(components=4, texture_mm=(2.5,))
    assert textured.features == FEATURES + ("sd_2.5mm",) and plain.features == FEATURES
    found = {}
    for params in (plain, textured):
        rng = np.random.default_rng(0)
        healthy = [appearance_features(*organ_with(rng)[:2], SPACING, params)[1] for _ in range(6)]
        assert healthy[0].shape[1] == len(params.features)
        model = fit_normative({"liver/CT": np.concatenate(healthy)}, params)
        shares = []
        for seed in (9, 10, 11):
            x, organ, ball = mosaic_organ(np.random.default_rng(seed), 0.02)
            assert abs(x[ball].mean() - 0.5) < 0.01  # the organ's mean, within its noise
            shares.append((model.candidates(x, organ, "liver", "CT", SPACING) & ball).sum() / ball.sum())
        found[params.texture_mm] = np.mean(shares)
        calm = model.candidates(*mosaic_organ(np.random.default_rng(9), 0.0)[:2], "liver", "CT", SPACING)
        assert calm.sum() <= 0.01 * organ.sum()
    assert found[(2.5,)] >= 0.5 and found[(2.5,)] >= found[()] + 0.25, found
    with pytest.raises(ValueError, match="texture_mm"):
        NormativeParams(texture_mm=(0.0,))
    assert NormativeParams.from_dict({"texture_mm": [2.5, 5]}).texture_mm == (2.5, 5.0)


def test_a_texture_model_round_trips_and_names_its_features():
    params = NormativeParams(components=2, texture_mm=(2.5, 5.0))
    rng = np.random.default_rng(3)
    model = fit_normative({"liver/CT": rng.normal(size=(400, len(params.features)))}, params)
    entry = model.entry()
    assert entry["features"][-2:] == ["sd_2.5mm", "sd_5mm"]
    loaded = NormativeModel.load(entry, model.state_dict())
    assert loaded.params == params
    # a manifest whose features its parameters do not compute does not load
    with pytest.raises(ValueError, match="features"):
        NormativeModel.load({**entry, "params": {**entry["params"], "texture_mm": [2.5]}}, model.state_dict())


def test_train_normative_texture_option():
    import argparse

    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a]).texture_mm  # noqa: E731
    assert parse() == DemoRecipe.normative_texture_mm
    assert parse("--texture-mm", "2.5,5") == (2.5, 5.0) and parse("--texture-mm", "none") == ()
    for bad in ("0", "a,b"):
        with pytest.raises(SystemExit):
            parse("--texture-mm", bad)


def test_intensity_only_features_are_the_full_models_columns():
    """``shape=False`` leaves out the Hessian eigenvalues and depth: the remaining columns are
    the full feature set's own, number for number, and such a model stores, loads and scores."""
    x, organ, ball = organ_with(np.random.default_rng(4), lesion=True)
    full = NormativeParams(components=2, texture_mm=(2.5,))
    plain = NormativeParams(components=2, texture_mm=(2.5,), shape=False)
    assert plain.features == ("mean_1.2mm", "mean_2.5mm", "mean_7mm", "sd_2.5mm")
    scored_full, feats_full = appearance_features(x, organ, SPACING, full)
    scored, feats = appearance_features(x, organ, SPACING, plain)
    assert np.array_equal(scored, scored_full)
    keep = [full.features.index(f) for f in plain.features]
    assert np.array_equal(feats, feats_full[:, keep])
    rng = np.random.default_rng(5)
    healthy = np.concatenate([appearance_features(*organ_with(rng)[:2], SPACING, plain)[1] for _ in range(6)])
    model = fit_normative({"liver/CT": healthy}, plain)
    loaded = NormativeModel.load(model.entry(), model.state_dict())
    assert loaded.params == plain and loaded.entry()["features"] == list(plain.features)
    found = loaded.candidates(x, organ, "liver", "CT", SPACING)
    assert (found & ball).sum() >= 0.5 * (ball & scored).sum()  # the dark ball is unlike the organ
    calm, calm_organ, _ = organ_with(np.random.default_rng(6))  # its vessel is healthy anatomy
    assert loaded.candidates(calm, calm_organ, "liver", "CT", SPACING).sum() <= 0.02 * calm_organ.sum()
    # manifests written before the option hold no "shape": all features, as they were fitted
    assert NormativeParams.from_dict({"components": 2}).shape is True


def test_train_normative_shape_option():
    import argparse

    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a]).shape  # noqa: E731
    assert parse() is DemoRecipe.normative_shape is True  # the recipe's: shape and depth too
    assert parse("--no-shape") is False and parse("--shape") is True


def test_unknown_organ_or_modality_gives_no_candidates(model):
    x, organ, _ = organ_with(np.random.default_rng(2), lesion=True)
    assert model.knows("liver", "CT") and model.knows("liver", "ct")
    assert not model.knows("liver", "MR") and not model.knows(None, "CT")
    assert not model.candidates(x, organ, "liver", "MR", SPACING).any()
    assert not model.candidates(x, organ, "spleen", "CT", SPACING).any()
    assert key("kidney", "T2") == "kidney/MR"


def test_hysteresis_grows_from_opened_seeds_only():
    score = np.zeros((12, 12, 12), np.float32)
    score[1:5, 1:5, 1:5] = 2.0  # grown region ...
    score[2:5, 2:5, 2:5] = 5.0  # ... with a seed that survives the opening
    score[8:11, 8:11, 8:11] = 2.0  # grown region whose only "seed" is one voxel
    score[9, 9, 9] = 5.0
    found = hysteresis(score, 1.0, 4.0)
    assert found[1:5, 1:5, 1:5].all() and not found[8:11, 8:11, 8:11].any()
    assert not hysteresis(np.zeros((4, 4, 4)), 1.0, 4.0).any()


def test_hysteresis_opened_in_slices_seeds_thin_lesions():
    """A lesion on two slices (8 mm at 4 mm slices) has no voxel whose 3D cross is whole, so
    the 3D opening drops its seed; the opening within each slice keeps it. A lone voxel seeds
    neither way."""
    score = np.zeros((12, 12, 12), np.float32)
    score[4:6, 2:7, 2:7] = 5.0
    score[9, 9, 9] = 5.0
    assert not hysteresis(score, 1.0, 4.0).any()
    found = hysteresis(score, 1.0, 4.0, in_slices=True)
    assert found[4:6, 2:7, 2:7].all() and found.sum() == 50
    with pytest.raises(ValueError, match="seed_opening"):
        NormativeParams(seed_opening="2d")


def test_hysteresis_seeds_only_where_allowed():
    score = np.zeros((12, 12, 12), np.float32)
    score[1:5, 1:5, 1:5] = 2.0
    score[2:5, 2:5, 2:5] = 5.0
    where = np.ones(score.shape, bool)
    assert hysteresis(score, 1.0, 4.0, where)[1:5, 1:5, 1:5].all()
    where[2:5, 2:5, 3:5] = False  # what is left of the seed does not survive the opening
    assert not hysteresis(score, 1.0, 4.0, where).any()


def test_confident_seeds_drop_candidates_where_the_organ_network_is_unsure(model):
    """With ``seed_log_odds`` a candidate grows only from seeds where the organ network's
    log-odds exceed it; without the log-odds (or the parameter) every interior voxel may
    seed, as before."""
    import dataclasses

    x, organ, lesion = organ_with(np.random.default_rng(7), lesion=True)
    sure = dataclasses.replace(model, params=dataclasses.replace(model.params, seed_log_odds=4.0))
    plain = model.candidates(x, organ, "liver", "CT", SPACING)
    assert (plain & lesion).any()
    confident = np.where(organ, 8.0, -8.0).astype(np.float32)
    assert np.array_equal(sure.candidates(x, organ, "liver", "CT", SPACING, confident), plain)
    assert np.array_equal(sure.candidates(x, organ, "liver", "CT", SPACING), plain)
    assert not sure.candidates(x, organ, "liver", "CT", SPACING, np.full(x.shape, 1.0, np.float32)).any()
    score = model.score_map(x, organ, "liver", "CT", SPACING)
    seeds = ndimage.binary_opening(score > model.mixtures["liver/CT"].high)
    assert seeds[:, :, 24:].any() and not seeds[:, :, :24].any()  # every seed on the lesion's side
    lesion_side, other_side = confident.copy(), confident.copy()
    lesion_side[:, :, :24] = 1.0  # sure of the organ on the lesion's side only
    other_side[:, :, 24:] = 1.0
    assert np.array_equal(sure.candidates(x, organ, "liver", "CT", SPACING, lesion_side), plain)
    assert not sure.candidates(x, organ, "liver", "CT", SPACING, other_side).any()
    assert np.array_equal(model.candidates(x, organ, "liver", "CT", SPACING, other_side), plain)
    # The log-odds come from the organ network only where the seeds need them.
    from diffugts.networks.organs import OrganNet

    net = OrganNet(["liver"])
    assert model.seed_maps(net, x) == {} and sure.seed_maps(None, x) == {}
    maps = sure.seed_maps(net, x)
    assert list(maps) == ["liver"] and maps["liver"].shape == x.shape


def test_fit_skips_organs_with_too_few_samples_and_sets_quantiles(model):
    rng = np.random.default_rng(3)
    fitted = fit_normative(
        {"liver/CT": rng.normal(size=(4000, len(FEATURES))), "spleen/CT": rng.normal(size=(10, len(FEATURES)))},
        NormativeParams(components=2),
    )
    assert list(fitted.mixtures) == ["liver/CT"]
    mix = fitted.mixtures["liver/CT"]
    assert mix.low < mix.high
    held = mix.score(rng.normal(size=(4000, len(FEATURES))))
    assert 0.9 < (held <= mix.low).mean() < 0.99 and 0.98 < (held <= mix.high).mean() <= 1.0


def test_round_trip_through_a_package(model, tmp_path):
    from diffugts.models.package import add_networks, open_package
    from modelfactory import random_package

    pkg = random_package(tmp_path, fused=True)
    assert normative_of(pkg) is None
    out = add_networks(pkg, {"normative": (model.entry(), model.state_dict())}, out=tmp_path / "with")
    loaded = normative_of(open_package(out.root))
    assert loaded is not None and loaded.params == model.params
    feats = np.random.default_rng(4).normal(size=(50, len(FEATURES)))
    a, b = model.mixtures["liver/CT"], loaded.mixtures["liver/CT"]
    assert np.allclose(a.score(feats), b.score(feats), rtol=1e-4, atol=1e-3)
    assert (a.low, a.high) == (b.low, b.high)
    with pytest.raises(ValueError, match="features"):
        NormativeModel.load({**model.entry(), "features": ["x"]}, model.state_dict())
    # `models verify` loads it; a manifest naming a mixture the weights lack does not pass.
    from diffugts.errors import ConfigError
    from diffugts.models.create import verify

    verify(out.root)
    broken = {**model.entry(), "keys": ["liver/CT", "kidney/CT"], "thresholds": {"kidney/CT": [0, 1]}}
    bad = add_networks(pkg, {"normative": (broken, model.state_dict())}, out=tmp_path / "bad")
    with pytest.raises(ConfigError, match="normative model does not load"):
        verify(bad.root)


def test_mixture_score_is_the_negative_log_likelihood():
    mix = Mixture(np.array([1.0]), np.zeros((1, 2)), np.eye(2)[None], 0.0, 1.0)
    assert mix.score(np.zeros((1, 2)))[0] == pytest.approx(np.log(2 * np.pi), rel=1e-5)
    assert mix.score(np.zeros((0, 2))).shape == (0,)


def test_the_recipe_refuses_normative_candidates_without_a_normative_model():
    from diffugts.errors import ConfigError
    from diffugts.train.recipe import DemoRecipe

    assert DemoRecipe().verifier_candidates == "normative" and DemoRecipe().normative_cases > 0
    with pytest.raises(ConfigError, match="normative"):
        DemoRecipe(organ_steps=0)
    with pytest.raises(ConfigError, match="normative"):
        DemoRecipe(normative_cases=0, normative_mr_cases=0)
    assert DemoRecipe(organ_steps=0, verifier_candidates="refined").organ_steps == 0


def test_reseeded_findings_move_the_seed_threshold_only(model):
    """Re-cut at 0 on the relative scale, findings hold their own candidates, with confident
    seeds and limited growth alike; a stricter threshold keeps a subset, and one no voxel
    reaches keeps nothing; a looser one, a superset."""
    import dataclasses

    x, organ, lesion = organ_with(np.random.default_rng(7), lesion=True)
    confident = np.where(organ, 8.0, -8.0).astype(np.float32)
    confident[:, :, 24:] = 1.0  # unsure on the lesion's side: no candidate there
    for params in (
        model.params,
        dataclasses.replace(model.params, seed_log_odds=4.0, grow_mm=3.0, seed_opening="slice"),
    ):
        m = dataclasses.replace(model, params=params)
        for log_odds in (None, confident):
            found = m.findings(x, organ, "liver", "CT", SPACING, log_odds)
            assert np.array_equal(m.reseeded(found, SPACING, 0.0), found.candidates)
            strict, loose = m.reseeded(found, SPACING, 0.5), m.reseeded(found, SPACING, -0.5)
            assert not (strict & ~found.candidates).any() and not (found.candidates & ~loose).any()
            assert not m.reseeded(found, SPACING, float(found.score.max())).any()
    plain = model.findings(x, organ, "liver", "CT", SPACING)
    assert (plain.candidates & lesion).any()
    assert m.growth(SPACING) == (True, 1) and model.growth(SPACING) == (False, None)
    assert m.seedable(None) is None and model.seedable(confident) is None
    assert np.array_equal(m.seedable(confident), confident > 4.0)
