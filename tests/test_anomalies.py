"""Generic synthetic anomalies for AOVA training (diffugts.train.anomalies)."""

import dataclasses

import numpy as np
import pytest

from diffugts.models.configs import get_config
from diffugts.phantom.split import SEEN_ORGANS
from diffugts.stages.preprocess import Preprocessing
from diffugts.train.anomalies import AnomalySpec, add_anomalies
from diffugts.train.aova import organ_family
from diffugts.train.data import phantom_case

SMALL = (16, 64, 64)


@pytest.fixture(scope="module")
def prep() -> Preprocessing:
    return Preprocessing.from_dict(get_config("demo")["preprocessing"])


@pytest.fixture(scope="module")
def healthy(prep):
    return [phantom_case(1000, i, prep, split="seen", healthy=True, shape=SMALL) for i in range(3)]


def _seen_labels(case) -> list[int]:
    return [label for label, name in case.organ_names.items() if name in SEEN_ORGANS]


def test_anomalies_are_painted_inside_seen_organs_only(healthy, prep):
    painted = 0
    for case in healthy:
        out = add_anomalies(case, prep, np.random.default_rng(0), AnomalySpec(count=(3, 3)))
        new = [r for r in out.records if r["type"] == "synthetic"]
        painted += len(new)
        mask = out.lesions > 0
        assert not (case.lesions > 0).any()  # the input is not modified
        assert np.isin(out.organs[mask], _seen_labels(case)).all()
        changed = np.abs(out.x - case.x) > 1e-6
        assert changed.any() == bool(new)
        # Only organ tissue changes (the soft edge stays inside the host organ too).
        assert np.isin(out.organs[changed], _seen_labels(case)).all()
        for rec in new:
            les = out.lesions == rec["id"]
            assert les.sum() == rec["voxels"] >= 4
            assert all(organ_family(rec["organ"]) in p for p in rec["prompts"]) and rec["split"] == "seen"
            shift = np.abs(out.x[les] - case.x[les]).mean() * (prep.ct_window[1] - prep.ct_window[0])
            assert 5.0 <= shift <= 130.0  # +-15..80 HU at full weight, texture on top; edges at half
    assert painted >= 3


def test_anomalies_are_reproducible_from_the_stream(healthy, prep):
    a = add_anomalies(healthy[0], prep, np.random.default_rng(7))
    b = add_anomalies(healthy[0], prep, np.random.default_rng(7))
    c = add_anomalies(healthy[0], prep, np.random.default_rng(8))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.lesions, b.lesions)
    assert not np.array_equal(a.lesions, c.lesions)


def test_both_signs_of_contrast_occur(healthy, prep):
    rng = np.random.default_rng(1)
    signs = set()
    for _ in range(6):
        out = add_anomalies(healthy[1], prep, rng, AnomalySpec(texture_hu=(0.0, 0.0)))
        for rec in out.records:
            les = out.lesions == rec["id"]
            signs.add(int(np.sign((out.x[les] - healthy[1].x[les]).mean())))
    assert signs == {-1, 1}


def test_no_seen_organ_means_no_anomaly(healthy, prep):
    case = healthy[0]
    only_unseen = dataclasses.replace(case, organ_names={k: "spleen" for k in case.organ_names})
    out = add_anomalies(only_unseen, prep, np.random.default_rng(0))
    assert np.array_equal(out.x, case.x) and not (out.lesions > 0).any() and out.records == case.records


def test_mr_cases_are_refused(healthy, prep):
    with pytest.raises(ValueError, match="CT"):
        add_anomalies(dataclasses.replace(healthy[0], modality="MR"), prep, np.random.default_rng(0))


@pytest.mark.slow
def test_train_aova_with_synthetic_cases_records_them(tmp_path, capsys, monkeypatch):
    """`diffugts train aova --synthetic-cases N` trains on them and says so in the manifest."""
    import json
    import sys

    from diffugts.cli import main

    out = tmp_path / "pkg"
    args = [
        "-q",
        "train",
        "aova",
        "--model",
        "demo",
        "--out",
        str(out),
        "--cases",
        "1",
        "--steps",
        "2",
        "--dim",
        "8",
        "--synthetic-cases",
        "1",
        "--randomised-cases",
        "0",
        "--mr-healthy-cases",
        "0",
        "--fusion-recall",
        "0",
    ]
    monkeypatch.setattr(sys, "argv", ["diffugts", *args])  # the manifest records the command line
    rc = main(args)
    assert rc == 0
    assert "held-out seen Dice" in capsys.readouterr().out
    training = json.loads((out / "manifest.json").read_text())["provenance"]["aova_training"]
    assert training["synthetic_cases"] == 1 and training["synthetic_lesions"] >= 1
    assert "--synthetic-cases 1" in training["command"]


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_relative_anomalies_for_the_verifier_are_painted_in_every_host_organ_of_either_modality(prep, modality):
    """The verifier's type-free lesions (with_relative_anomalies): inside a host organ of any
    family (not only the seen ones), painted into the volume and normalised from it, so that
    synthesis (the volume) and the evidence maps (x) see the same anomaly; a shift of at least
    half the organ's spread; one record per painted organ; the input case untouched."""
    from diffugts.stages.preprocess import normalise
    from diffugts.train.anomalies import RelativeAnomalySpec, with_relative_anomalies
    from diffugts.train.refine import HOST_FAMILIES

    families, hosts_seen = set(), 0
    for i in range(3):
        case = phantom_case(1000, i, prep, split="seen", healthy=True, shape=SMALL, modality=modality, keep_volume=True)
        before = case.volume.copy()
        hosts = [lb for lb, name in case.organ_names.items() if organ_family(name) in HOST_FAMILIES]
        hosts_seen += len([lb for lb in hosts if (case.organs == lb).any()])
        out = with_relative_anomalies(
            case, prep, np.random.default_rng(i), chance=1.0, spec=RelativeAnomalySpec(contrast=(2.0, 3.0))
        )
        assert np.array_equal(case.volume, before) and not case.lesions.any() and not case.records
        assert np.array_equal(out.x, normalise(out.volume, modality, prep))
        changed = np.abs(out.volume - case.volume) > 1e-3
        assert np.isin(out.organs[changed], hosts).all()  # only host organ tissue changes
        for rec in out.records:
            les = out.lesions == rec["id"]
            assert les.sum() == rec["voxels"] >= 4 and rec["split"] == "synthetic"
            label = [lb for lb, name in case.organ_names.items() if name == rec["organ"]][0]
            assert (out.organs[les] == label).all()
            families.add(organ_family(rec["organ"]))
            assert changed[les].mean() > 0.9
    assert families >= {"liver", "kidney", "spleen"}, families  # unseen organs too
    with pytest.raises(ValueError, match="keep it"):
        with_relative_anomalies(phantom_case(1000, 0, prep, healthy=True, shape=SMALL), prep, np.random.default_rng(0))


def test_relative_anomalies_respect_their_chance(prep):
    from diffugts.train.anomalies import with_relative_anomalies

    case = phantom_case(1000, 0, prep, split="seen", healthy=True, shape=SMALL, keep_volume=True)
    none = with_relative_anomalies(case, prep, np.random.default_rng(0), chance=0.0)
    assert not none.records and not none.lesions.any() and np.array_equal(none.volume, case.volume)
