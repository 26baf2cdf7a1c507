"""The normative model's evidence for the lesion verifier (relative score, organ log-odds), its
healthy reference as inference sees it, and thresholds cut on held-out cases."""

from __future__ import annotations

import numpy as np
import pytest

import diffugts.train.normative as train_normative
from diffugts.stages.normative import Findings, NormativeParams, appearance_features, relative_score
from diffugts.stages.verification import CORE_LEVEL, NORMATIVE_EVIDENCE, Evidence, LesionVerifier, candidates
from diffugts.train.data import TrainingCase
from diffugts.train.normative import fit_normative, normative_samples
from test_normative import SPACING, organ_with


def test_relative_score_is_zero_at_the_seed_and_minus_one_at_the_growing_threshold():
    score = np.array([2.0, 5.0, 8.0, -np.inf, 11.0], np.float32)
    rel = relative_score(score, low=5.0, high=8.0)
    assert rel.dtype == np.float32
    assert np.allclose(rel, [-2.0, -1.0, 0.0, -1.0, 1.0])  # unscored counts as at the growing threshold


def test_findings_hold_the_candidates_and_the_score_they_were_cut_from():
    rng = np.random.default_rng(0)
    feats = [appearance_features(*organ_with(rng)[:2], SPACING)[1] for _ in range(6)]
    model = fit_normative({"liver/CT": np.concatenate(feats)}, NormativeParams(components=4))
    x, organ, ball = organ_with(np.random.default_rng(2), lesion=True)
    log_odds = np.where(organ, 6.0, -6.0).astype(np.float32)
    found = model.findings(x, organ, "liver", "CT", SPACING, log_odds)
    assert isinstance(found, Findings) and found.log_odds is log_odds
    assert np.array_equal(found.image, x)  # what the verifier's continuation reads around a candidate
    assert np.array_equal(found.candidates, model.candidates(x, organ, "liver", "CT", SPACING, log_odds))
    assert (found.candidates & ball).any()
    mix = model.mixtures["liver/CT"]
    score = model.score_map(x, organ, "liver", "CT", SPACING)
    assert np.allclose(found.score, relative_score(score, mix.low, mix.high))
    assert found.score[found.candidates].min() > -1.0  # every candidate voxel is above the growing threshold
    assert (found.score[~organ] == -1.0).all()
    # an organ the model does not know: no candidates, a flat score, the log-odds passed on
    none = model.findings(x, organ, "spleen", "CT", SPACING, log_odds)
    assert not none.candidates.any() and (none.score == -1.0).all() and none.log_odds is log_odds


def _two_candidates():
    """A candidate far above its organ's thresholds and sure to be organ, and one just above
    them in tissue the organ network doubts."""
    mask = np.zeros((10, 10, 10), bool)
    mask[1:4, 1:4, 1:4] = True
    mask[6:8, 6:8, 6:8] = True
    score = np.full(mask.shape, -1.0, np.float32)
    score[1:4, 1:4, 1:4] = 2.0
    score[2, 2, 2] = 5.0
    score[6:8, 6:8, 6:8] = -0.5
    log_odds = np.full(mask.shape, 6.0, np.float32)
    log_odds[6:8, 6:8, 6:8] = 0.5
    flat = np.zeros(mask.shape, np.float32)
    organ = np.ones(mask.shape, np.float32)
    evidence = Evidence(flat, flat, flat, flat, organ, (4.0, 2.75, 2.75), normative=score, organ_log_odds=log_odds)
    return mask, evidence


def test_normative_features_are_per_candidate_means_and_maxima():
    mask, evidence = _two_candidates()
    labels, ids, feats = candidates(mask, evidence, 0.01, features=NORMATIVE_EVIDENCE)
    by_size = {int((labels == i).sum()): dict(zip(NORMATIVE_EVIDENCE, f)) for i, f in zip(ids, feats)}
    strong, weak = by_size[27], by_size[8]
    assert strong["normative_mean"] == pytest.approx((26 * 2.0 + 5.0) / 27, rel=1e-5)
    assert strong["normative_max"] == 5.0 and strong["organ_log_odds"] == 6.0
    assert weak["normative_mean"] == weak["normative_max"] == -0.5 and weak["organ_log_odds"] == 0.5
    # without the maps the features cannot be measured, and say which map is missing
    bare = Evidence(*(getattr(evidence, f) for f in ("refined", "coarse", "deviation", "residual", "organ")))
    with pytest.raises(ValueError, match="organ_log_odds"):
        candidates(mask, bare, 0.01, features=("organ_log_odds",))


def test_a_candidates_core_is_its_volume_clearly_above_the_seed_threshold():
    """``core_ml``: log10 mL (+ 0.01) of the candidate's voxels scoring above CORE_LEVEL, every
    part of it (a candidate over several small foci keeps each one's core); a candidate grown
    from scattered seeds through barely unusual tissue has little or none."""
    mask = np.zeros((3, 3, 20), bool)
    mask[1, 1, 0:12] = True  # one candidate: a bar along the last axis
    mask[1, 1, 15:19] = True  # another, nowhere clearly abnormal
    score = np.full(mask.shape, -1.0, np.float32)
    score[1, 1, 0:4] = 2.0  # one part of the core: 4 voxels
    score[1, 1, 4] = CORE_LEVEL  # at the level is not above it
    score[1, 1, 5:7] = 3.0  # another part of the same candidate's core: 2 voxels
    score[1, 1, 7:12] = -0.5
    score[1, 1, 15:19] = 0.5  # seeds, but no core
    flat = np.zeros(mask.shape, np.float32)
    evidence = Evidence(flat, flat, flat, flat, np.ones(mask.shape, np.float32), normative=score)
    labels, ids, feats = candidates(mask, evidence, 0.01, features=("core_ml", "log_volume_ml"))
    by_size = {int((labels == i).sum()): f for i, f in zip(ids, feats)}
    assert by_size[12][0] == pytest.approx(np.log10(6 * 0.01 + 0.01))
    assert by_size[4][0] == pytest.approx(-2.0)  # no core at all: log10(0.01)
    assert by_size[12][1] == pytest.approx(np.log10(0.12))
    with pytest.raises(ValueError, match="normative"):  # the score map is needed
        candidates(mask, Evidence(flat, flat, flat, flat, flat), 0.01, features=("core_ml",))


def test_continuation_reads_the_image_around_each_candidate():
    """The verifier's ``continuation`` and ``surround`` (diffugts.stages.delineation) per candidate,
    from the evidence's image, organ, normative score and spacing; without the image it cannot
    be measured, and the error says so."""
    shape, spacing = (12, 24, 24), (4.0, 2.75, 2.75)
    organ = np.zeros(shape, np.float32)
    organ[1:-1, 2:-2, 2:-2] = 1.0
    image = np.where(organ > 0, 0.5, 0.1).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[5:7, 5:9, 5:9] = True  # a bounded lesion
    image[mask] = 0.8
    image[6, 16:18, :] = 0.8  # a vessel across the organ...
    mask[6, 16:18, 10:13] = True  # ...of which a candidate holds a piece
    score = np.where(mask, 2.0, -1.0).astype(np.float32)
    flat = np.zeros(shape, np.float32)
    evidence = Evidence(flat, flat, flat, flat, organ, spacing, normative=score, image=image)
    labels, ids, feats = candidates(mask, evidence, 0.01, features=("continuation", "surround", "log_volume_ml"))
    by_size = {int((labels == i).sum()): f[:2] for i, f in zip(ids, feats)}
    assert by_size[32][0] == pytest.approx(0.0, abs=1e-6)  # the lesion is all the tissue like it
    assert by_size[6][0] == pytest.approx(np.log(3.0), abs=0.2)  # the vessel goes on 3 voxels (8.25 mm) either side
    assert (
        by_size[32][1] == 0.0 and 0.0 < by_size[6][1] < 0.5
    )  # organ around the lesion; the vessel at the piece's ends
    for name in ("continuation", "surround"):
        with pytest.raises(ValueError, match=f"{name} feature needs the evidence's image"):
            candidates(mask, Evidence(flat, flat, flat, flat, organ, spacing, normative=score), 0.01, features=(name,))


def test_a_verifier_weighs_normative_evidence_of_normative_candidates_only():
    entry = {
        "weights": [1.0, 1.0],
        "bias": 0.0,
        "mean": [0.0, 0.0],
        "scale": [1.0, 1.0],
        "threshold": 0.5,
        "features": ["normative_mean", "organ_log_odds"],
        "candidate_source": "normative",
    }
    verifier = LesionVerifier.from_dict(entry)
    mask, evidence = _two_candidates()
    labels, ids, feats = candidates(mask, evidence, 0.01, features=verifier.features)
    kept = {int((labels == i).sum()) for i, s in zip(ids, verifier.scores(feats)) if s >= verifier.threshold}
    assert kept == {27, 8}  # both stand above a weightless bias ...
    strict = LesionVerifier.from_dict({**entry, "bias": -4.0})
    kept = {int((labels == i).sum()) for i, s in zip(ids, strict.scores(feats)) if s >= strict.threshold}
    assert kept == {27}  # ... and a stricter one keeps the sure one only
    with pytest.raises(ValueError, match="normative candidates"):
        LesionVerifier.from_dict({**entry, "candidate_source": "deviation"})
    for context in ("continuation", "surround"):  # the image's context too
        with pytest.raises(ValueError, match="normative candidates"):
            LesionVerifier.from_dict({**entry, "features": [context, "organ_log_odds"], "candidate_source": "refined"})


def test_the_context_features_may_count_against_a_lesion():
    """Evidence weights stay non-negative (they count for a lesion); the image's context counts
    against one: a verifier fitted where the false candidates lie along tissue like them
    weighs ``continuation`` and ``surround`` negatively."""
    from diffugts.train.verify import fit_verifier

    rng = np.random.default_rng(0)
    lesion = rng.random(200) < 0.4
    context = np.where(lesion, 0.05, 0.5) + rng.normal(0, 0.1, 200)
    core = rng.normal(0, 1, 200)
    samples = [
        {"features": np.array([c, x, x]), "lesion": bool(y), "voxels": 10, "hits": 10 * int(y)}
        for c, x, y in zip(core, context, lesion)
    ]
    features = ("core_ml", "continuation", "surround")
    verifier, _ = fit_verifier(samples, 10 * int(lesion.sum()), "normative", 2.0, features)
    assert verifier.weights[1] + verifier.weights[2] < -1.0 and verifier.weights[0] >= 0.0


def _case_with_a_vessel_beside_the_organ():
    """A healthy case whose organ map also grounds a bright tube just outside the true organ
    (as the map grounds the vena cava as liver)."""
    x, organ, _ = organ_with(np.random.default_rng(7), vessel=False)
    tube = np.zeros(organ.shape, bool)
    tube[8:16, 2:6, 10:38] = True
    tube &= ~organ
    x = np.where(tube, 0.8, x).astype(np.float32)
    case = TrainingCase("c", "CT", x, organ.astype(np.uint8), np.zeros(x.shape, np.uint16), [], {1: "liver"})
    return case, organ, organ | tube


@pytest.mark.parametrize("reference", ["organ", "organ_map"])
def test_the_healthy_reference_is_the_true_organ_or_the_organ_as_its_map_grounds_it(monkeypatch, reference):
    case, organ, mapped = _case_with_a_vessel_beside_the_organ()
    monkeypatch.setattr(train_normative, "_case_organs", lambda *a: iter([("liver", mapped, organ)]))
    params = NormativeParams(margin_mm=0.0, reference=reference)
    rows = normative_samples([case], None, SPACING, params)["liver/CT"]
    scored, feats = appearance_features(case.x, mapped, SPACING, params)
    expected = scored.sum() if reference == "organ_map" else (scored & organ).sum()
    assert len(rows) == expected
    bright = feats[:, 0].max() / 2  # the tube's voxels stand far above the organ's median
    assert (rows[:, 0] > bright).any() == (reference == "organ_map")
    with pytest.raises(ValueError, match="reference"):
        NormativeParams(reference="truth")


def test_thresholds_are_cut_on_the_calibration_cases_when_given():
    rng = np.random.default_rng(3)
    params = NormativeParams(components=2)
    fit_on = rng.normal(size=(4000, len(params.features)))
    wider = rng.normal(scale=1.5, size=(3000, len(params.features)))  # new cases vary more
    voxels = fit_normative({"liver/CT": fit_on}, params, seed=0).mixtures["liver/CT"]
    cases = fit_normative({"liver/CT": fit_on}, params, seed=0, calibration={"liver/CT": wider}).mixtures["liver/CT"]
    held = cases.score(wider)
    assert (held > cases.high).mean() == pytest.approx(1 - params.high_quantile, abs=0.003)
    assert (held > cases.low).mean() == pytest.approx(1 - params.low_quantile, abs=0.01)
    assert cases.high > voxels.high  # cut on held-out voxels, the thresholds flag wider new cases too often
    # a key the calibration lacks falls back to held-out voxels
    other = fit_normative({"liver/CT": fit_on}, params, seed=0, calibration={"spleen/CT": wider}).mixtures["liver/CT"]
    assert (other.low, other.high) == (voxels.low, voxels.high)


def test_train_normative_reference_and_calibration_options():
    import argparse

    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["train", "normative", "--model", "m", *a])  # noqa: E731
    args = parse()
    assert args.reference == DemoRecipe.normative_reference
    assert args.calibration_cases == DemoRecipe.normative_calibration_cases
    args = parse("--reference", "organ_map", "--calibration-cases", "3")
    assert args.reference == "organ_map" and args.calibration_cases == 3
    with pytest.raises(SystemExit):
        parse("--reference", "truth")
    assert DemoRecipe().normative_params().reference == DemoRecipe.normative_reference
    # manifests written before the option were fitted on the true organ
    assert NormativeParams.from_dict({"components": 2}).reference == "organ"


def test_train_verifier_refuses_normative_features_of_other_candidates(tmp_path, capsys):
    from diffugts.cli import main

    out = tmp_path / "out"
    args = ["-q", "train", "verifier", "--model", str(tmp_path / "none"), "--out", str(out)]
    code = main([*args, "--candidates", "deviation", "--features", "depth_rel,normative_max"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "normative_max" in err[0] and "deviation" in err[0]
    assert not out.exists()
    code = main([*args, "--candidates", "refined", "--features", "depth_rel,continuation"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "continuation" in err[0] and "refined" in err[0]
    assert not out.exists()
    code = main([*args, "--candidates", "deviation", "--features", "log_volume_ml", "--grow-mm", "9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--grow-mm" in err[0] and "deviation" in err[0]
    assert not out.exists()


def test_fitting_samples_of_normative_candidates_carry_their_evidence():
    """``train verifier --candidates normative`` samples each example's normative candidates,
    weighing the score and log-odds they were found with (as inference weighs them)."""
    from diffugts.networks.refine import SHARED_CHANNELS, TARGET_CHANNELS
    from diffugts.train.refine import Example
    from diffugts.train.verify import component_samples

    mask, evidence = _two_candidates()
    truth = np.zeros(mask.shape, bool)
    truth[1:4, 1:4, 1:4] = True
    inputs = np.zeros((SHARED_CHANNELS + len(TARGET_CHANNELS), *mask.shape), np.float32)
    found = Findings(mask, evidence.normative, evidence.organ_log_odds)
    example = Example(inputs, truth, truth, found)
    samples = component_samples(
        [example], [np.zeros(mask.shape, np.float32)], 0.5, 0.01, 0.0, "normative", features=NORMATIVE_EVIDENCE
    )
    rows = sorted((s["lesion"], s["voxels"], tuple(np.round(s["features"], 4))) for s in samples)
    strong = (round((26 * 2.0 + 5.0) / 27, 4), 5.0, 6.0, round(np.log10(27 * 0.01 + 0.01), 4))
    assert rows == [(False, 8, (-0.5, -0.5, 0.5, -2.0)), (True, 27, strong)]


def test_a_fit_grounds_each_case_once_for_healthy_and_painted_samples(monkeypatch):
    case, organ, mapped = _case_with_a_vessel_beside_the_organ()
    calls = []

    def grounding(*args):
        calls.append(1)
        return iter([("liver", mapped, organ)])

    monkeypatch.setattr(train_normative, "_case_organs", grounding)
    params = NormativeParams(margin_mm=0.0)
    healthy = normative_samples([case, case], None, SPACING, params)
    painted, halo = train_normative.anomaly_samples([case, case], None, SPACING, params, seed=3)
    assert len(calls) == 4  # each call grounds every case
    grounded = train_normative.ground_cases([case, case], None, SPACING, None)
    assert len(calls) == 6
    again = normative_samples([case, case], None, SPACING, params, grounded=grounded)
    painted_again, _ = train_normative.anomaly_samples([case, case], None, SPACING, params, seed=3, grounded=grounded)
    assert len(calls) == 6  # grounded once, read twice
    assert np.array_equal(healthy["liver/CT"], again["liver/CT"])
    assert np.array_equal(painted["liver/CT"], painted_again["liver/CT"]) and len(painted["liver/CT"])
    assert halo == {}  # none without params.halo_mm
