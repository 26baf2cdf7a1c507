"""Claimed anatomy (diffugts.networks.organs): an organ network that also labels the vena cava
and the abdominal vessels claims them, and an organ's map, closed over its holes and
concavities, does not take claimed voxels in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffugts.networks.organs import ANATOMY, CLAIMED, OrganNet, claimed, organ_maps
from diffugts.stages.deviation import DeviationParams, organ_from_log_odds, organ_with_inclusions

SPACING_KJI = (4.0, 2.75, 2.75)


def _liver_with_two_holes():
    """A slab of liver (log-odds 5) with two round holes (-5): a lesion, and a vessel that the
    vessel class holds (its log-odds 5 there)."""
    liver = np.full((6, 40, 40), -5.0, np.float32)
    liver[:, 5:35, 5:35] = 5.0
    yy, xx = np.mgrid[:40, :40]
    lesion = (yy - 14) ** 2 + (xx - 14) ** 2 <= 9
    vessel = (yy - 26) ** 2 + (xx - 26) ** 2 <= 9
    liver[:, lesion] = liver[:, vessel] = -5.0
    vessels = np.full(liver.shape, -5.0, np.float32)
    vessels[:, vessel] = 5.0
    return liver, vessels, np.broadcast_to(lesion, liver.shape), np.broadcast_to(vessel, liver.shape)


def test_another_class_above_the_threshold_claims_a_voxel_the_organ_does_not_hold():
    liver, vessels, lesion, vessel = _liver_with_two_holes()
    out = claimed({"liver": liver, "abdominal vessels": vessels}, 0.0)
    assert (out["liver"][vessel] == CLAIMED).all()
    assert (out["liver"][lesion] == -5.0).all(), "nothing claims the lesion: its log-odds stay"
    assert (out["liver"][liver > 0] == liver[liver > 0]).all(), "the organ's own voxels are never claimed"
    assert (out["abdominal vessels"][liver > 0] == CLAIMED).all(), "and the liver claims its voxels from the vessels"
    assert not np.isneginf(claimed({"liver": liver, "abdominal vessels": vessels}, 6.0)["liver"]).any()


def test_an_organs_inclusions_take_its_lesion_but_not_a_claimed_vessel():
    liver, vessels, lesion, vessel = _liver_with_two_holes()
    params = DeviationParams(close_mm=10.0)
    unclaimed = organ_from_log_odds(liver, SPACING_KJI, params)
    assert unclaimed[lesion].all() and unclaimed[vessel].all(), "without claims both holes are filled"
    organ = organ_from_log_odds(
        claimed({"liver": liver, "abdominal vessels": vessels}, 0.0)["liver"], SPACING_KJI, params
    )
    assert organ[lesion].all(), "the lesion stays inside its organ"
    assert not organ[vessel].any(), "the claimed vessel does not"
    np.testing.assert_array_equal(organ, unclaimed & ~vessel)
    np.testing.assert_array_equal(organ_with_inclusions(liver > 0, SPACING_KJI, params), unclaimed)


def test_a_network_claims_only_when_its_config_says_so():
    x = np.random.default_rng(0).random((32, 64, 64), dtype=np.float32)
    torch.manual_seed(0)
    net = OrganNet(["liver", "kidney"] + list(ANATOMY), features=(4, 4, 8, 8, 8, 4)).eval()
    assert "claim_log_odds" not in net.config and net.claim_log_odds is None, "older configs stay as they were"
    plain = organ_maps(net, x)
    assert not any(np.isneginf(m).any() for m in plain.values())
    net.claim_log_odds = -0.5  # low enough that this untrained network claims something
    maps = organ_maps(net, x)
    expected = claimed(plain, -0.5)
    assert list(maps) == ["liver", "kidney", *ANATOMY]
    for organ in maps:
        np.testing.assert_array_equal(maps[organ], expected[organ])
    assert any(np.isneginf(m).any() for m in maps.values())
    again = OrganNet.from_config({**net.config, "claim_log_odds": 0.0})
    assert again.claim_log_odds == 0.0 and again.config["claim_log_odds"] == 0.0


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A copy of the demo package whose organ network was trained (a few steps) with claims."""
    from diffugts.models.defaults import DEMO_MODEL
    from diffugts.train.run import train_organ_net

    out = tmp_path_factory.mktemp("claims") / "pkg"
    return train_organ_net(
        str(DEMO_MODEL),
        out,
        cases=1,
        steps=2,
        mr_healthy_cases=0,
        show_progress=False,
        phantom_shape=(32, 64, 64),
        refit_fusion=False,
        claim_anatomy=True,
    )


def test_training_with_claims_labels_the_anatomy_and_records_the_threshold(package):
    from diffugts.networks.organs import load_organ_net
    from diffugts.train.organs import ORGANS

    net = load_organ_net(package)
    assert net is not None and net.organs == ORGANS + list(ANATOMY) and net.claim_log_odds == 0.0
    assert package.manifest["provenance"]["organ_training"]["organs"] == ORGANS + list(ANATOMY)


def test_normative_fitting_takes_organs_not_the_claimed_anatomy(package):
    from diffugts.networks.organs import load_organ_net
    from diffugts.stages.preprocess import Preprocessing
    from diffugts.train.data import phantom_case
    from diffugts.train.normative import ground_cases

    prep = Preprocessing.from_dict(package.manifest["preprocessing"])
    case = phantom_case(2000, 0, prep, healthy=True, shape=(32, 64, 64))
    (organs,) = ground_cases([case], load_organ_net(package), SPACING_KJI, DeviationParams())
    assert [fam for fam, _, _ in organs] == ["liver", "kidney", "spleen", "pancreas", "stomach", "gallbladder", "aorta"]


def test_the_cli_option_reaches_training(monkeypatch):
    import argparse

    from diffugts.cli import train as train_cli
    from diffugts.train import run
    from diffugts.train.recipe import DemoRecipe

    parser = argparse.ArgumentParser()
    parser.add_argument("-q", "--quiet", action="store_true")
    train_cli.register(parser.add_subparsers())
    args = parser.parse_args(["train", "organs", "--model", "m"])
    assert args.claim_anatomy is DemoRecipe.organ_claim_anatomy is False
    seen = {}

    class Written:
        manifest = {"provenance": {"organ_training": {"held_out_dice": {"liver": 0.9}}}}
        root = "out"

    def fake(*a, **k):
        seen.update(k)
        return Written()

    monkeypatch.setattr(run, "train_organ_net", fake)
    args = parser.parse_args(["train", "organs", "--model", "m", "--claim-anatomy"])
    assert args.func(args) == 0 and seen["claim_anatomy"] is True
