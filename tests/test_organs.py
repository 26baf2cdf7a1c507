"""Organ grounding (diffugts.networks.organs): the network, its labels, its training, and the
coarse stage taking a target's organ from it where it knows the organ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffugts.networks.organs import OrganNet, grounded_region, organ_maps
from diffugts.train.organs import ORGANS, class_weights, organ_dice, organ_labels, train_organs

SPACING_KJI = (4.0, 2.75, 2.75)


@pytest.fixture(scope="module")
def case():
    from diffugts.models.defaults import DEMO_MODEL
    from diffugts.models.package import open_package
    from diffugts.stages.preprocess import Preprocessing
    from diffugts.train.data import phantom_case

    prep = Preprocessing.from_dict(open_package(DEMO_MODEL).manifest["preprocessing"])
    return phantom_case(2000, 1, prep, split="seen", shape=(32, 64, 64))


def test_the_network_gives_one_map_per_organ_on_the_input_grid():
    net = OrganNet(["liver", "kidney"]).eval()
    assert net.work_shape((64, 128, 128)) == (64, 64, 64)
    assert net.work_shape((40, 100, 90)) == (32, 48, 48)  # the nearest multiple of 16 per axis
    maps = organ_maps(net, np.random.default_rng(0).random((40, 100, 90), dtype=np.float32))
    assert list(maps) == ["liver", "kidney"]
    assert all(m.shape == (40, 100, 90) and m.dtype == np.float32 for m in maps.values())
    assert organ_maps(None, np.zeros((8, 8, 8), np.float32)) == {}


def test_labels_are_organ_families_that_hold_their_lesions(case):
    labels = organ_labels(case, ORGANS)
    kidney = ORGANS.index("kidney") + 1
    names = {n: label for label, n in case.organ_names.items()}
    both = (case.organs == names["left kidney"]) | (case.organs == names["right kidney"])
    assert both.any() and (labels[both] == kidney).all()  # both kidneys are one family
    assert case.records, "the fixture case carries a lesion"
    for rec in case.records:
        host = ORGANS.index(rec["organ"].replace("left ", "").replace("right ", "")) + 1
        assert (labels[case.lesions == rec["id"]] == host).all()  # the lesion belongs to its organ
    assert (labels[case.organs == names["muscle"]] == 0).all()


def test_class_weights_favour_small_organs_over_background():
    labels = np.zeros((10, 10, 10), np.int64)
    labels[:4] = 1  # a large organ: 40 %
    labels[4, :2] = 2  # a small one: 2 %
    w = class_weights([labels, labels], 4).numpy()  # class 3 appears nowhere
    assert w[0] < w[1] < w[2], "the rarer the class, the more its voxels weigh"
    assert np.isclose(w[1] / w[2], np.sqrt(0.02 / 0.40), rtol=1e-5)  # the square root of the frequency ratio
    assert w[3] == w.max() == w[2], "an absent class weighs as much as the rarest present one"


def test_training_lowers_the_loss_and_learns_the_liver(case):
    torch.manual_seed(0)
    net, losses = train_organs([case], SPACING_KJI, steps=40, seed=0, randomise_p=0.0, show_progress=False)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    dice = organ_dice(net, [case], SPACING_KJI)
    assert dice["liver"] > 0.5, dice


def test_training_stops_at_its_time_limit_and_takes_the_networks_config(case):
    net, losses = train_organs(
        [case],
        SPACING_KJI,
        steps=50,
        max_seconds=0.0,
        net_config={"features": (4, 4, 8, 8, 8, 4), "downsample": 1},
        show_progress=False,
    )
    assert losses == [], "no step starts after the time limit"
    assert net.config["features"] == [4, 4, 8, 8, 8, 4] and net.downsample == 1
    _, losses = train_organs([case], SPACING_KJI, steps=3, max_seconds=600.0, show_progress=False)
    assert len(losses) == 3, "a limit not reached changes nothing"


def test_a_target_takes_its_organ_from_the_network_where_it_knows_the_organ():
    head, net = np.zeros((4, 4, 4), np.float32), np.ones((4, 4, 4), np.float32)
    grounding = {"liver": net}
    assert grounded_region("liver", head, grounding) is net
    assert grounded_region("colon", head, grounding) is head  # an organ it does not know
    assert grounded_region(None, head, grounding) is head


class UpperHalfLiver(OrganNet):
    """A stand-in network that calls the upper half of every volume liver."""

    def __init__(self):
        super().__init__(["liver"])

    def forward(self, x):
        lo = torch.full((x.shape[0], 2) + tuple(x.shape[2:]), -5.0)
        lo[:, 1, : x.shape[2] // 2] = 5.0
        return lo


def test_the_coarse_stage_uses_the_packages_organ_network(case):
    import SimpleITK as sitk

    from diffugts.artifacts.study import Study
    from diffugts.core import Core
    from diffugts.models.defaults import DEMO_MODEL

    image = sitk.GetImageFromArray((case.x * 600.0 - 250.0).astype(np.float32))
    image.SetSpacing((2.75, 2.75, 4.0))  # the demo model grid: no resampling
    prompts = ["liver tumor", "pancreas tumor"]
    plain = Core(str(DEMO_MODEL))
    plain.organ_net = None  # the head's regions, whether or not the shipped package has a network
    grounded = Core(str(DEMO_MODEL), backbone=plain.backbone)
    grounded.organ_net = UpperHalfLiver()
    (liver, pancreas), (_, own) = (
        core.attend(core.prepare(Study.from_image(image, "CT")), prompts).coarse.organ for core in (grounded, plain)
    )
    half = liver.shape[0] // 2
    assert liver[:half].all() and not liver[half:].any()  # the network's liver
    np.testing.assert_array_equal(pancreas, own)  # an organ it does not know: the head's region


def test_train_organs_offers_no_checkpoint_flag_it_would_ignore(capsys):
    from diffugts.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "organs", "--model", "demo", "--checkpoint-every", "5"])
    assert exit_.value.code == 2 and "--checkpoint-every" in capsys.readouterr().err


def test_painted_lesions_change_host_organs_only_and_keep_the_labels(case):
    from diffugts.train.organs import with_painted_lesions
    from diffugts.train.refine import HOST_FAMILIES

    painted = with_painted_lesions(case, np.random.default_rng(3), SPACING_KJI, chance=1.0)
    changed = painted.x != case.x
    assert changed.any(), "every host organ was drawn: something is painted"
    host = np.isin(case.organs, [label for label, n in case.organ_names.items() if n.split()[-1] in HOST_FAMILIES])
    assert not (changed & ~host).any(), "nothing outside the host organs changes"
    assert not (changed & (case.lesions > 0)).any(), "real lesions stay as they are"
    np.testing.assert_array_equal(organ_labels(painted, ORGANS), organ_labels(case, ORGANS))  # still the organ's
    assert (
        case.x is not painted.x
        and not (with_painted_lesions(case, np.random.default_rng(3), SPACING_KJI, chance=0.0).x != case.x).any()
    )


def test_fine_tuning_starts_from_the_given_weights_and_paints_when_asked(case, monkeypatch):
    import diffugts.train.organs as organs_module

    start = OrganNet(ORGANS)
    calls = []
    real = organs_module.with_painted_lesions
    monkeypatch.setattr(organs_module, "with_painted_lesions", lambda c, *a, **k: calls.append(1) or real(c, *a, **k))
    net, _ = train_organs([case], SPACING_KJI, steps=0, init=start.state_dict(), show_progress=False)
    for name, w in net.state_dict().items():
        torch.testing.assert_close(w, start.state_dict()[name])  # no step: the weights it started from
    train_organs([case], SPACING_KJI, steps=6, anomaly_p=1.0, randomise_p=0.0, show_progress=False)
    assert len(calls) == 6, "anomaly_p=1 paints every step"
    calls.clear()
    train_organs([case], SPACING_KJI, steps=6, anomaly_p=0.0, randomise_p=0.0, show_progress=False)
    assert calls == []


def test_train_organs_fine_tunes_the_packages_network(tmp_path):
    from diffugts.errors import ConfigError
    from diffugts.models.defaults import DEMO_MODEL
    from diffugts.models.package import open_package
    from diffugts.networks.organs import load_organ_net
    from diffugts.train.run import train_organ_net

    kwargs = dict(cases=1, mr_healthy_cases=0, show_progress=False, phantom_shape=(32, 64, 64), refit_fusion=False)
    pkg = train_organ_net(str(DEMO_MODEL), tmp_path / "ft", steps=1, fine_tune=True, anomaly_p=1.0, **kwargs)
    shipped, tuned = load_organ_net(open_package(DEMO_MODEL)), load_organ_net(pkg)
    assert tuned.config == shipped.config
    record = pkg.manifest["provenance"]["organ_training"]
    assert record["anomaly_p"] == 1.0 and record["lr"] == 1e-3
    assert (
        record["fine_tuned_from"]["seconds"]
        == open_package(DEMO_MODEL).manifest["provenance"]["organ_training"]["seconds"]
    )
    # one step at a low rate moves the weights a little, from the shipped ones
    a = torch.cat([w.flatten().float() for w in shipped.state_dict().values()])
    b = torch.cat([w.flatten().float() for w in tuned.state_dict().values()])
    assert 0 < (a - b).abs().max() < 0.05
    for bad in ({"anomaly_p": 1.5}, {"lr": 0.0}):
        with pytest.raises(ConfigError, match="--anomaly-p must lie in"):
            train_organ_net(str(DEMO_MODEL), tmp_path / "no", steps=1, **bad, **kwargs)
    with pytest.raises(ConfigError, match="--claim-anatomy must match"):
        train_organ_net(str(DEMO_MODEL), tmp_path / "no", steps=1, fine_tune=True, claim_anatomy=True, **kwargs)
    assert not (tmp_path / "no").exists()


def test_the_cli_passes_fine_tuning_painting_and_rate(monkeypatch):
    from diffugts.cli import main
    from diffugts.train import run
    from diffugts.train.recipe import DemoRecipe

    seen = {}

    class Written:
        manifest = {"provenance": {"organ_training": {"held_out_dice": {"liver": 0.9}}}}
        root = "out"

    monkeypatch.setattr(run, "train_organ_net", lambda *a, **k: seen.update(k) or Written())
    assert main(["-q", "train", "organs", "--model", "m"]) == 0
    assert seen["fine_tune"] is False and seen["anomaly_p"] == DemoRecipe.organ_anomaly_p and seen["lr"] is None
    assert main(["-q", "train", "organs", "--model", "m", "--fine-tune", "--anomaly-p", "0.5", "--lr", "5e-4"]) == 0
    assert seen["fine_tune"] is True and seen["anomaly_p"] == 0.5 and seen["lr"] == 5e-4
