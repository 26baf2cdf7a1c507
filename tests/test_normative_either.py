"""The normative model's "either" score: the larger of the anomaly discriminator's and the
mixture's relative scores, cut at healthy quantiles of its own; fitting, storage, partial refits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffugts.stages.discriminator import Discriminator, mlp
from diffugts.stages.normative import (
    Either,
    Mixture,
    NormativeModel,
    NormativeParams,
    appearance_features,
    normative_of,
    relative_score,
)
from diffugts.train.normative import anomaly_samples, fit_normative, normative_samples, refitted
from test_discriminator import fake_case
from test_normative import SPACING, organ_with

PARAMS = NormativeParams(components=2, texture_mm=(2.5,), score="either")


def linear_discriminator(weight: float, low: float, high: float) -> Discriminator:
    """A one-feature discriminator whose log-odds are ``weight`` times the feature."""
    net = mlp(1, hidden=1)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.fill_(1.0)
                layer.bias.zero_()
        net[0].weight.fill_(weight)  # SiLU of a large positive input is that input
    return Discriminator(np.zeros(1, np.float32), np.ones(1, np.float32), net, low, high)


def test_either_is_the_larger_relative_score_of_its_members():
    mixture = Mixture(np.ones(1), np.zeros((1, 1)), np.ones((1, 1, 1)), 3.0, 5.0)  # a standard normal's NLL
    disc = linear_discriminator(1.0, 2.0, 4.0)
    either = Either(disc, mixture, 0.0, 1.0)
    rows = np.array([[-8.0], [0.0], [3.0], [9.0], [30.0]], np.float32)
    d = relative_score(disc.score(rows), disc.low, disc.high)
    m = relative_score(mixture.score(rows), mixture.low, mixture.high)
    assert np.allclose(either.score(rows), np.maximum(d, m))
    # far below: the discriminator calls it healthy, the mixture has never seen such tissue
    assert d[0] < -1.0 and m[0] > 0.0 and either.score(rows[:1])[0] == pytest.approx(m[0])
    assert either.score(np.zeros((0, 1), np.float32)).shape == (0,)


def test_fit_either_cuts_each_member_and_their_maximum_at_healthy_quantiles(monkeypatch):
    monkeypatch.setattr("diffugts.stages.discriminator.STEPS", 300)
    rng = np.random.default_rng(3)
    healthy = {"liver/CT": rng.normal(size=(6000, 2))}
    anomalies = {"liver/CT": rng.normal(size=(600, 2)) + [3.0, 0.0]}
    params = NormativeParams(components=2, score="either")
    with pytest.raises(ValueError, match="either normative model needs anomaly samples"):
        fit_normative(healthy, params)
    fitted = fit_normative(healthy, params, anomalies=anomalies)
    assert list(fitted.scorers) == list(fitted.mixtures) == list(fitted.discriminators) == ["liver/CT"]
    either = fitted.scorers["liver/CT"]
    assert isinstance(either, Either)
    assert either.discriminator is fitted.discriminators["liver/CT"] and either.mixture is fitted.mixtures["liver/CT"]
    fresh = rng.normal(size=(20000, 2))
    for scorer in (either, either.discriminator, either.mixture):
        s = scorer.score(fresh)
        assert scorer.low < scorer.high
        assert 0.90 < (s <= scorer.low).mean() < 0.99 and 0.98 < (s <= scorer.high).mean() <= 1.0
    # unlike any healthy row in a direction no anomaly was painted: the mixture's part flags it
    far = np.array([[0.0, -12.0]], np.float32)
    assert either.score(far)[0] > either.high


@pytest.fixture(scope="module")
def either_model():
    """An "either" model of healthy organs (each crossed by its bright vessel), fitted through the
    training code on their voxels and anomalies painted into them."""
    rng = np.random.default_rng(0)
    cases = [fake_case(*organ_with(rng)[:2]) for _ in range(6)]
    organs = {id(c.x): c.organs > 0 for c in cases}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("diffugts.train.normative.organ_maps", lambda net, x: {"liver": np.where(organs[id(x)], 9.0, -9.0)})
        healthy = normative_samples(cases, None, SPACING, PARAMS)
        painted, _ = anomaly_samples(cases, None, SPACING, PARAMS, seed=0)
    return fit_normative(healthy, PARAMS, seed=0, anomalies=painted)


def test_either_finds_a_lesion_as_bright_as_the_vessel_and_leaves_the_vessel(either_model):
    """The organ's spread is its noise (0.01) and its vessel lies 20 spreads above it, beyond
    every painted anomaly (at most 6 spreads): a lesion ball of the vessel's intensity, as in the
    MR livers of development seeds (docs/benchmarks.md, "Either score"). Here the discriminator
    finds it too; where it does not, the mixture's part does (the test above)."""
    rng = np.random.default_rng(7)
    x, organ, ball = organ_with(rng, lesion=True)
    x[ball] = 0.7
    found = either_model.candidates(x, organ, "liver", "CT", SPACING)
    scored, _ = appearance_features(x, organ, SPACING, PARAMS)
    vessel = (x > 0.65) & organ & ~ball
    assert (found & ball).sum() >= 0.5 * (ball & scored).sum()
    assert (found & vessel).sum() <= 0.15 * vessel.sum()
    calm, calm_organ, _ = organ_with(np.random.default_rng(8))
    assert either_model.candidates(calm, calm_organ, "liver", "CT", SPACING).sum() <= 0.02 * calm_organ.sum()


def test_an_either_model_round_trips_through_a_package(either_model, tmp_path):
    from diffugts.models.create import verify
    from diffugts.models.package import add_networks, open_package
    from modelfactory import random_package

    entry = either_model.entry()
    k = "liver/CT"
    e = either_model.either[k]
    assert entry["thresholds"][k] == [e.low, e.high]
    assert entry["member_thresholds"][k] == {
        "discriminative": [e.discriminator.low, e.discriminator.high],
        "likelihood": [e.mixture.low, e.mixture.high],
    }
    out = add_networks(
        random_package(tmp_path, fused=True), {"normative": (entry, either_model.state_dict())}, out=tmp_path / "o"
    )
    verify(out.root)
    loaded = normative_of(open_package(out.root))
    assert loaded is not None and loaded.params == PARAMS and list(loaded.scorers) == [k]
    feats = np.random.default_rng(4).normal(size=(50, len(PARAMS.features))).astype(np.float32)
    a, b = either_model.scorers[k], loaded.scorers[k]
    assert np.allclose(a.score(feats), b.score(feats), atol=1e-4) and (a.low, a.high) == (b.low, b.high)
    assert "member_thresholds" not in NormativeModel(NormativeParams(score="discriminative")).entry()


def test_a_partial_refit_keeps_the_other_organs_either(monkeypatch):
    monkeypatch.setattr("diffugts.stages.discriminator.STEPS", 100)
    rng = np.random.default_rng(5)
    params = NormativeParams(components=2, score="either")
    rows = lambda: rng.normal(size=(3000, 2))  # noqa: E731
    painted = lambda: rng.normal(size=(300, 2)) + 3.0  # noqa: E731
    before = fit_normative(
        {"liver/CT": rows(), "spleen/CT": rows()}, params, anomalies={"liver/CT": painted(), "spleen/CT": painted()}
    )
    again = fit_normative({"spleen/CT": rows()}, params, seed=1, anomalies={"spleen/CT": painted()})
    merged = refitted(before, again, ["spleen"])
    assert (
        merged.either["liver/CT"] is before.either["liver/CT"]
        and merged.either["spleen/CT"] is again.either["spleen/CT"]
    )
    assert merged.mixtures["spleen/CT"] is again.mixtures["spleen/CT"]
    assert sorted(merged.scorers) == ["liver/CT", "spleen/CT"]


def test_either_option():
    import argparse

    from diffugts.cli import train as train_cli

    assert PARAMS.discriminative and NormativeParams(score="discriminative").discriminative
    assert not NormativeParams().discriminative
    NormativeParams(score="either", members=2, halo_mm=6.0)  # a committee and a halo need a discriminator: it has one
    with pytest.raises(ValueError, match="members"):
        NormativeParams(score="likelihood", members=2)
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    assert parser.parse_args(["train", "normative", "--model", "m", "--score", "either"]).score == "either"
