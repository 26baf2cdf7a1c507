"""The look-alike atlas (diffugts.stages.lookalikes) and the verifier's ``lookalikes`` feature:
places in an organ's box, look-alikes near a place per study, the atlas in the verifier's
entry, and `train verifier` building it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffugts.cli import main
from diffugts.stages.lookalikes import FLOOR, NONE, RADIUS, Lookalikes, atlas_entry, lookalikes_for, places
from diffugts.stages.verification import Evidence, LesionVerifier, candidates
from diffugts.train.recipe import DemoRecipe
from diffugts.train.verify import fit_verifier
from test_train_demo import DEMO_MODEL


def _organ_and_two_candidates():
    organ = np.zeros((12, 22, 32), bool)
    organ[1:11, 1:21, 1:31] = True  # box 1..10, 1..20, 1..30
    mask = np.zeros(organ.shape, bool)
    mask[1:4, 1:4, 1:4] = True  # centre (2, 2, 2): the box's first corner, one voxel in
    mask[5:8, 10:13, 20:23] = True  # centre (6, 11, 21)
    return organ, mask


def test_a_place_is_a_centroid_in_its_organs_box():
    organ, mask = _organ_and_two_candidates()
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    got = places(labels, [1, 2], organ)
    assert got == pytest.approx(np.array([[1 / 9, 1 / 19, 1 / 29], [5 / 9, 10 / 19, 20 / 29]]))
    assert places(labels, [], organ).shape == (0, 3)
    # the same candidates in an organ twice the size along the last axis lie half as far along it
    wide = np.zeros((12, 22, 62), bool)
    wide[1:11, 1:21, 1:61] = True
    labels_wide = np.zeros(wide.shape, np.int32)
    labels_wide[:, :, :32] = labels
    assert places(labels_wide, [2], wide)[0, 2] == pytest.approx(20 / 59)


def test_lookalikes_are_counted_near_a_place_per_study():
    atlas = Lookalikes(np.array([[0.5, 0.5, 0.5], [0.52, 0.5, 0.5], [0.9, 0.9, 0.9]]), studies=4)
    got = atlas.feature(np.array([[0.5, 0.5, 0.5 + RADIUS / 2], [0.1, 0.1, 0.1], [0.9, 0.9, 0.9 + 1.5 * RADIUS]]))
    assert got == pytest.approx(np.log(np.array([2 / 4, 0.0, 0.0]) + FLOOR))
    assert NONE.feature(np.array([[0.5, 0.5, 0.5]])) == pytest.approx([np.log(FLOOR)])  # no studies: nothing near


def test_the_atlas_entry_round_trips_and_knows_only_its_keys():
    found = {"liver/CT": [np.array([[0.1, 0.2, 0.3]]), np.zeros((0, 3)), np.array([[0.4, 0.5, 0.6]])]}
    entry = json.loads(json.dumps(atlas_entry(found, {"liver/CT": 3, "spleen/MR": 2})))
    assert entry["spleen/MR"] == {"studies": 2, "places": []}  # studies without a look-alike count too
    liver = lookalikes_for(entry, "liver/CT")
    assert liver.studies == 3 and liver.places == pytest.approx(np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]))
    assert lookalikes_for(entry, "kidney/CT") is NONE and lookalikes_for(None, "liver/CT") is NONE
    assert lookalikes_for(entry, "spleen/MR").feature(np.array([[0.5, 0.5, 0.5]])) == pytest.approx([np.log(FLOOR)])


def test_the_lookalikes_feature_reads_the_evidences_atlas():
    organ, mask = _organ_and_two_candidates()
    flat = np.zeros(organ.shape, np.float32)
    # three studies, two of which raised a look-alike where the second candidate lies
    atlas = Lookalikes(np.array([[5 / 9, 10 / 19, 20 / 29], [0.56, 0.52, 0.69]]), studies=3)
    evidence = Evidence(flat, flat, flat, flat, organ.astype(np.float32), (4.0, 2.75, 2.75), lookalikes=atlas)
    labels, ids, feats = candidates(mask, evidence, 0.01, features=("lookalikes",))
    by_first = {int(np.argwhere(labels == i)[0][0]): f[0] for i, f in zip(ids, feats)}
    assert by_first[1] == pytest.approx(np.log(FLOOR)) and by_first[5] == pytest.approx(np.log(2 / 3 + FLOOR))
    with pytest.raises(ValueError, match="lookalikes feature needs the evidence's look-alike atlas"):
        candidates(mask, Evidence(flat, flat, flat, flat, organ), 0.01, features=("lookalikes",))


def test_a_verifier_that_weighs_lookalikes_carries_its_atlas():
    entry = {
        "weights": [1.0, -1.0],
        "bias": 0.0,
        "mean": [0.0, 0.0],
        "scale": [1.0, 1.0],
        "threshold": 0.5,
        "features": ["core_ml", "lookalikes"],
        "candidate_source": "normative",
    }
    with pytest.raises(ValueError, match="no look-alike atlas"):
        LesionVerifier.from_dict(entry)
    with pytest.raises(ValueError, match="normative candidates"):
        LesionVerifier.from_dict({**entry, "candidate_source": "refined", "lookalikes": {}})
    atlas = atlas_entry({"liver/CT": [np.array([[0.5, 0.5, 0.5]])]}, {"liver/CT": 1})
    verifier = LesionVerifier.from_dict({**entry, "lookalikes": atlas})
    again = LesionVerifier.from_dict(json.loads(json.dumps(verifier.as_dict())))
    assert again == verifier and again.lookalikes == atlas


def test_lookalikes_may_count_against_a_lesion():
    """Like the image's context, the look-alikes near a candidate are free to count against a
    lesion (the evidence weights stay non-negative)."""
    rng = np.random.default_rng(1)
    lesion = rng.random(200) < 0.4
    near = np.where(lesion, np.log(FLOOR), np.log(0.5 + FLOOR)) + rng.normal(0, 0.3, 200)
    samples = [
        {"features": np.array([c, x]), "lesion": bool(y), "voxels": 10, "hits": 10 * int(y)}
        for c, x, y in zip(rng.normal(0, 1, 200), near, lesion)
    ]
    verifier, _ = fit_verifier(samples, 10 * int(lesion.sum()), "normative", 2.0, ("core_ml", "lookalikes"))
    assert verifier.weights[1] < -1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--features", "core_ml,lookalikes", "--lookalike-cases", "0"], "--lookalike-cases"),
        (["--features", "core_ml", "--lookalike-cases", "2"], "add it to --features"),
    ],
)
def test_train_verifier_builds_an_atlas_exactly_when_the_feature_reads_it(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["-q", "train", "verifier", "--model", str(DEMO_MODEL), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_train_verifier_stores_the_atlas_of_lesion_free_cases(tmp_path, capsys):
    """`train verifier --lookalike-cases 1`: one lesion-free CT and one MR phantom of the
    verifier's own range make the atlas, per organ and modality, stored with the verifier."""
    out = tmp_path / "lookalikes"
    args = ["-q", "train", "verifier", "--model", str(DEMO_MODEL), "--out", str(out), "--cases", "1"]
    args += ["--healthy-cases", "1", "--features", "core_ml,continuation,lookalikes", "--lookalike-cases", "1"]
    assert main(args) == 0
    assert main(["models", "verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    report = manifest["provenance"]["verifier_training"]
    assert report["lookalike_cases"] == 1 and report["features"] == ["core_ml", "continuation", "lookalikes"]
    verifier = manifest["networks"]["refine"]["verifier"]
    atlas = verifier["lookalikes"]
    assert {k.split("/")[1] for k in atlas} == {"CT", "MR"}  # both modalities
    assert {"liver/CT", "liver/MR"} <= set(atlas) and all(e["studies"] == 1 for e in atlas.values())
    assert sum(len(e["places"]) for e in atlas.values()) > 0  # the phantoms' look-alikes
    assert all(0.0 <= v <= 1.0 for e in atlas.values() for p in e["places"] for v in p)
    assert LesionVerifier.from_dict(verifier).lookalikes == atlas
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, cases",
    [
        (["--features", "core_ml,lookalikes"], DemoRecipe.verifier_lookalike_cases),  # the recipe's atlas
        (["--features", "core_ml,lookalikes", "--lookalike-cases", "3"], 3),
        (["--features", "core_ml"], 0),  # no feature reads an atlas: none made
    ],
)
def test_train_verifier_makes_the_recipes_atlas_when_the_features_read_it(monkeypatch, extra, cases):
    import diffugts.train.run as run

    asked = {}

    def record(*args, **kwargs):
        asked.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(run, "train_lesion_verifier", record)
    with pytest.raises(SystemExit):
        main(["-q", "train", "verifier", "--model", str(DEMO_MODEL), *extra])
    assert asked["lookalike_cases"] == cases
