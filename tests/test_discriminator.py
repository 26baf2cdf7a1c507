"""The normative model's anomaly discriminator: generic anomalies painted into healthy organs,
an MLP that tells them from healthy tissue, its candidates, storage and options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffugts.stages.deviation import DeviationParams, local_mean, organ_interior, robust_centre
from diffugts.stages.discriminator import Discriminator, fit_discriminator
from diffugts.stages.normative import NormativeModel, NormativeParams, appearance_features, normative_of
from diffugts.train.anomalies import RelativeAnomalySpec, organ_relative_anomaly
from diffugts.train.data import TrainingCase
from diffugts.train.normative import anomaly_samples, fit_normative, normative_samples
from test_normative import SPACING, organ_with

PARAMS = NormativeParams(components=2, texture_mm=(2.5,), score="discriminative")


def spread_of(x, organ):
    inner = organ_interior(organ, np.asarray(SPACING), DeviationParams(margin_mm=5.0))
    return robust_centre(local_mean(x, organ, 2.5, np.asarray(SPACING))[inner], 0.02)[1]


def test_painted_anomalies_stay_in_their_organ_and_shift_by_its_spread():
    x, organ, _ = organ_with(np.random.default_rng(0), vessel=False)
    spread = spread_of(x, organ)
    spec = RelativeAnomalySpec(count=(2, 2), contrast=(3.0, 3.0), texture=(0.0, 0.0))
    painted_x, painted = organ_relative_anomaly(x, organ, spread, SPACING, np.random.default_rng(1), spec)
    assert painted.any() and not (painted & ~organ).any()
    assert np.array_equal(painted_x[~organ], np.clip(x[~organ], 0, 1))  # nothing painted outside
    shift = np.abs(painted_x[painted] - x[painted])
    assert 1.5 * spread <= np.median(shift) <= 3.0 * spread + 1e-6  # 3 spreads, softened at the edge
    assert painted_x.min() >= 0.0 and painted_x.max() <= 1.0 and painted_x.dtype == np.float32
    again, _ = organ_relative_anomaly(x, organ, spread, SPACING, np.random.default_rng(1), spec)
    assert np.array_equal(again, painted_x)  # reproducible from its generator


def test_fit_discriminator_ranks_anomalies_above_healthy_rows():
    rng = np.random.default_rng(0)
    healthy, anomalies = rng.normal(size=(3000, 3)), rng.normal(size=(500, 3)) + [3.0, 0.0, 0.0]
    d = fit_discriminator(anomalies, healthy, seed=0, steps=200)
    assert d.score(anomalies).mean() > d.score(healthy).mean() + 3.0
    assert d.score(np.zeros((0, 3))).shape == (0,)
    state = d.state_dict("liver/CT.discriminator")
    loaded = Discriminator.load(state, "liver/CT.discriminator", 1.0, 2.0)
    assert np.array_equal(loaded.score(healthy[:50]), d.score(healthy[:50])) and (loaded.low, loaded.high) == (1.0, 2.0)


def fake_case(x, organ, modality="CT"):
    return TrainingCase("c", modality, x, organ.astype(np.uint8), np.zeros(x.shape, np.uint16), [], {1: "liver"})


@pytest.fixture(scope="module")
def discriminative(monkeypatch_module):
    """A discriminative model of healthy organs (each crossed by its vessel), fitted on their
    healthy voxels and anomalies painted into them, through the training code."""
    rng = np.random.default_rng(0)
    cases = [fake_case(*organ_with(rng)[:2]) for _ in range(6)]
    # the organ network's part: the true organ, confidently
    monkeypatch_module.setattr(
        "diffugts.train.normative.organ_maps", lambda net, x: {"liver": np.where(cases_organ(x), 9.0, -9.0)}
    )
    organs = {id(c.x): c.organs > 0 for c in cases}

    def cases_organ(x):
        return organs[id(x)]

    healthy = normative_samples(cases, None, SPACING, PARAMS)
    painted, halo = anomaly_samples(cases, None, SPACING, PARAMS, seed=0)
    assert set(healthy) == set(painted) == {"liver/CT"} and halo == {}
    assert painted["liver/CT"].shape[1] == len(PARAMS.features)
    return fit_normative(healthy, PARAMS, seed=0, anomalies=painted)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_discriminator_finds_a_lesion_and_leaves_the_vessel(discriminative):
    torch.manual_seed(0)
    assert list(discriminative.discriminators) == ["liver/CT"] and not discriminative.mixtures
    assert discriminative.knows("liver", "CT") and not discriminative.knows("liver", "MR")
    x, organ, lesion = organ_with(np.random.default_rng(7), lesion=True)
    found = discriminative.candidates(x, organ, "liver", "CT", SPACING)
    scored, _ = appearance_features(x, organ, SPACING, PARAMS)
    vessel = (x > 0.65) & organ
    assert (found & lesion).sum() >= 0.5 * (lesion & scored).sum()
    assert (found & vessel).sum() <= 0.15 * vessel.sum()  # the organ's own vessel is healthy anatomy
    calm, calm_organ, _ = organ_with(np.random.default_rng(8))
    assert discriminative.candidates(calm, calm_organ, "liver", "CT", SPACING).sum() <= 0.02 * calm_organ.sum()


def test_a_discriminative_model_round_trips_through_a_package(discriminative, tmp_path):
    from diffugts.models.create import verify
    from diffugts.models.package import add_networks, open_package
    from modelfactory import random_package

    entry = discriminative.entry()
    assert entry["params"]["score"] == "discriminative" and entry["keys"] == ["liver/CT"]
    pkg = random_package(tmp_path, fused=True)
    out = add_networks(pkg, {"normative": (entry, discriminative.state_dict())}, out=tmp_path / "with")
    verify(out.root)  # `models verify` loads it
    loaded = normative_of(open_package(out.root))
    assert loaded is not None and loaded.params == PARAMS
    feats = np.random.default_rng(4).normal(size=(50, len(PARAMS.features))).astype(np.float32)
    a, b = discriminative.discriminators["liver/CT"], loaded.discriminators["liver/CT"]
    assert np.allclose(a.score(feats), b.score(feats), atol=1e-5) and (a.low, a.high) == (b.low, b.high)


def test_fit_needs_anomalies_and_skips_organs_without_enough(monkeypatch):
    monkeypatch.setattr("diffugts.stages.discriminator.STEPS", 300)
    rng = np.random.default_rng(3)
    healthy = {"liver/CT": rng.normal(size=(4000, 2)), "spleen/CT": rng.normal(size=(4000, 2))}
    params = NormativeParams(components=2, score="discriminative")
    with pytest.raises(ValueError, match="anomaly samples"):
        fit_normative(healthy, params)
    fitted = fit_normative(
        healthy, params, anomalies={"liver/CT": rng.normal(size=(400, 2)) + 3, "spleen/CT": rng.normal(size=(5, 2))}
    )
    assert list(fitted.discriminators) == ["liver/CT"]
    d = fitted.discriminators["liver/CT"]
    held = d.score(rng.normal(size=(4000, 2)))
    assert d.low < d.high and 0.9 < (held <= d.low).mean() < 0.99


def test_score_option_and_old_manifests():
    import argparse

    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    with pytest.raises(ValueError, match="score"):
        NormativeParams(score="density")
    assert NormativeParams.from_dict({"components": 2}).score == "likelihood"  # fitted before the option
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a]).score  # noqa: E731
    assert parse() == DemoRecipe.normative_score == DemoRecipe().normative_params().score
    assert parse("--score", "discriminative") == "discriminative"
    with pytest.raises(SystemExit):
        parse("--score", "density")
    model = NormativeModel(NormativeParams())
    assert model.scorers is model.mixtures


def test_a_committee_scores_the_mean_of_members_fitted_on_their_own_cases(monkeypatch, tmp_path):
    """--members: each further member fits on its own samples; the score is the members' mean
    log-odds, cut at the healthy quantiles of that mean; stored member by member, it loads as it
    was fitted, and a key some member lacks samples for gets no scorer."""
    from diffugts.models.create import verify
    from diffugts.models.package import add_networks, open_package
    from diffugts.stages.discriminator import Committee
    from modelfactory import random_package

    monkeypatch.setattr("diffugts.stages.discriminator.STEPS", 300)
    rng = np.random.default_rng(5)
    draw = lambda n, shift=0.0: rng.normal(size=(n, 2)) + [shift, 0.0]  # noqa: E731
    params = NormativeParams(components=2, score="discriminative", members=2)
    healthy, painted = (
        {"liver/CT": draw(4000), "spleen/CT": draw(4000)},
        {"liver/CT": draw(400, 3), "spleen/CT": draw(400, 3)},
    )
    other = ({"liver/CT": draw(3000), "spleen/CT": draw(3000)}, {"liver/CT": draw(300, 3), "spleen/CT": draw(10, 3)})
    with pytest.raises(ValueError, match="members"):
        fit_normative(healthy, params, anomalies=painted)  # the second member's samples are missing
    fitted = fit_normative(healthy, params, anomalies=painted, members=[other])
    assert list(fitted.discriminators) == ["liver/CT"]  # the second member has too few spleen anomalies
    c = fitted.discriminators["liver/CT"]
    assert isinstance(c, Committee) and len(c.members) == 2
    rows = draw(2000)
    mean = (c.members[0].score(rows) + c.members[1].score(rows)) / 2
    assert np.allclose(c.score(rows), mean, atol=1e-6)
    assert not np.allclose(c.members[0].score(rows), c.members[1].score(rows), atol=1e-2)  # two fits, not one
    assert c.low < c.high and 0.9 < (c.score(rows) <= c.low).mean() < 0.99  # cut on the committee's score
    pkg = random_package(tmp_path, fused=True)
    out = add_networks(pkg, {"normative": (fitted.entry(), fitted.state_dict())}, out=tmp_path / "with")
    verify(out.root)
    loaded = normative_of(open_package(out.root))
    assert loaded is not None and loaded.params.members == 2
    assert np.allclose(loaded.discriminators["liver/CT"].score(rows), c.score(rows), atol=1e-5)
    assert (loaded.discriminators["liver/CT"].low, loaded.discriminators["liver/CT"].high) == (c.low, c.high)
    with pytest.raises(ValueError, match="members"):
        NormativeParams(members=2)  # a committee of discriminators, not of mixtures
    with pytest.raises(ValueError, match="members"):
        NormativeParams(score="discriminative", members=0)
    assert NormativeParams.from_dict({"score": "discriminative"}).members == 1  # models fitted before


def test_the_halo_around_painted_anomalies_joins_the_healthy_class(monkeypatch):
    """halo_mm: the painted copies' healthy voxels from HALO_GAP_MM to halo_mm around the
    anomalies are sampled (the anomalies themselves unchanged) and fitted as healthy, but the
    thresholds stay cut on healthy voxels of their own."""
    from dataclasses import replace

    from diffugts.train.normative import HALO_GAP_MM

    rng = np.random.default_rng(3)
    cases = [fake_case(*organ_with(rng)[:2]) for _ in range(2)]
    organs = {id(c.x): c.organs > 0 for c in cases}
    monkeypatch.setattr(
        "diffugts.train.normative.organ_maps", lambda net, x: {"liver": np.where(organs[id(x)], 9.0, -9.0)}
    )
    plain, none = anomaly_samples(cases, None, SPACING, PARAMS, seed=1)
    near, ring = anomaly_samples(cases, None, SPACING, replace(PARAMS, halo_mm=10.0), seed=1)
    _, wide = anomaly_samples(cases, None, SPACING, replace(PARAMS, halo_mm=20.0), seed=1)
    _, inside_gap = anomaly_samples(cases, None, SPACING, replace(PARAMS, halo_mm=HALO_GAP_MM), seed=1)
    assert none == {} and inside_gap == {}
    assert np.array_equal(plain["liver/CT"], near["liver/CT"])  # the same anomalies
    assert 0 < len(ring["liver/CT"]) < len(wide["liver/CT"])
    assert ring["liver/CT"].shape[1] == len(PARAMS.features)

    monkeypatch.setattr("diffugts.stages.discriminator.STEPS", 300)
    draw = np.random.default_rng(5).normal
    # column 0 a fine feature, column 1 a coarse one: around an anomaly only the coarse one departs
    healthy = {"liver/CT": draw(size=(4000, 2))}
    painted = {"liver/CT": draw(size=(600, 2)) + [4.0, 4.0]}
    halo = {"liver/CT": draw(size=(600, 2)) * [1.0, 0.3] + [0.0, 4.0]}
    two = replace(PARAMS, components=2)
    without = fit_normative(healthy, two, seed=0, anomalies=painted).discriminators["liver/CT"]
    withit = fit_normative(healthy, replace(two, halo_mm=10.0), seed=0, anomalies=painted, halo=halo)
    d = withit.discriminators["liver/CT"]
    rows = halo["liver/CT"]
    assert (without.score(rows) > without.high).mean() > 0.5  # the ring looked anomalous
    assert (d.score(rows) > d.high).mean() < 0.2  # hardly any more
    assert (d.score(painted["liver/CT"]) > d.high).mean() > 0.9  # the anomalies still do
    held = d.score(draw(size=(4000, 2)))
    assert 0.9 < (held <= d.low).mean() < 0.99  # cut on healthy voxels, not on the ring
    with pytest.raises(ValueError, match="halo_mm"):
        NormativeParams(halo_mm=10.0)  # a mixture has no healthy class to add it to
    with pytest.raises(ValueError, match="halo_mm"):
        NormativeParams(score="discriminative", halo_mm=-1.0)
    assert NormativeParams.from_dict({"score": "discriminative"}).halo_mm == 0.0  # models fitted before it


def test_train_normative_halo_option():
    import argparse

    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a]).halo_mm  # noqa: E731
    assert parse() == DemoRecipe.normative_halo_mm == DemoRecipe().normative_params().halo_mm
    assert parse("--halo-mm", "10") == 10.0
