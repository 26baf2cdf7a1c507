"""Lesion verification: component features, the verifier's decisions, its fitting, and the
refine stage and evaluate applying it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk

from diffugts.cli import main
from diffugts.models.package import add_networks
from diffugts.phantom import CaseSpec, generate_case, write_case
from diffugts.stages.lookalikes import FLOOR, atlas_entry
from diffugts.stages.normative import FEATURES as NORMATIVE_FEATURES, Mixture, NormativeModel, NormativeParams
from diffugts.stages.verification import (
    FEATURES,
    GEOMETRY,
    Evidence,
    LesionVerifier,
    candidates,
    deviation_candidates,
    scored_verified,
    verified,
    verifier_of,
)
from diffugts.train.verify import fit_verifier
from modelfactory import random_package


def two_blobs():
    """A 3x3x3 blob with strong evidence and a 2x2x2 one with weak evidence."""
    mask = np.zeros((12, 12, 12), bool)
    mask[1:4, 1:4, 1:4] = True
    mask[8:10, 8:10, 8:10] = True
    strong = np.zeros(mask.shape, np.float32)
    strong[1:4, 1:4, 1:4] = 0.9
    strong[2, 2, 2] = 1.0
    strong[8:10, 8:10, 8:10] = 0.2
    organ = np.ones(mask.shape, bool)
    organ[8:10, 8:10, 8] = False  # half the small blob lies outside the organ
    evidence = Evidence(refined=strong, coarse=strong / 2, deviation=strong * 4, residual=strong / 10, organ=organ)
    return mask, evidence


def test_candidate_features_are_per_component_volumes_and_means():
    mask, evidence = two_blobs()
    labels, ids, feats = candidates(mask, evidence, voxel_ml=0.01)
    assert len(ids) == 2 and feats.shape == (2, len(FEATURES))
    by_size = {int((labels == i).sum()): f for i, f in zip(ids, feats)}
    big, small = by_size[27], by_size[8]
    f = dict(zip(FEATURES, big))
    assert f["log_volume_ml"] == pytest.approx(np.log10(0.27))
    assert f["refined_mean"] == pytest.approx((26 * 0.9 + 1.0) / 27, rel=1e-5) and f["refined_max"] == 1.0
    assert f["coarse_mean"] == pytest.approx(f["refined_mean"] / 2, rel=1e-5)
    assert f["deviation_mean"] == pytest.approx(f["refined_mean"] * 4, rel=1e-5)
    assert f["organ_fraction"] == 1.0
    assert dict(zip(FEATURES, small))["organ_fraction"] == pytest.approx(0.5)
    # The minimum volume leaves the small one out (0.08 mL < 0.1 mL).
    assert len(candidates(mask, evidence, voxel_ml=0.01, min_volume_ml=0.1)[1]) == 1


def test_geometric_features_tell_a_deep_ball_from_a_sliver_at_the_organs_border():
    """Depth below the organ's surface and elongation, in mm on an anisotropic grid."""
    spacing = (4.0, 1.0, 1.0)  # (k, j, i): thick slices, as the model grid's
    organ = np.zeros((12, 48, 48), bool)
    organ[1:11, 2:46, 2:46] = True
    mask = np.zeros(organ.shape, bool)
    mask[4:7, 18:30, 18:30] = True  # 12 x 12 x 12 mm, in the organ's middle
    mask[5, 3, 10:40] = True  # a one-voxel sliver along the organ's border
    zeros = np.zeros(organ.shape, np.float32)
    evidence = Evidence(zeros, zeros, zeros, zeros, organ, spacing_mm=spacing)
    labels, ids, feats = candidates(mask, evidence, 0.004, features=GEOMETRY)
    assert feats.shape == (2, 4)
    ball, sliver = sorted(feats.tolist(), key=lambda f: -f[0])
    assert 12.0 <= ball[0] <= 20.0 and sliver[0] == pytest.approx(2.0)  # depth (mm): to the nearest surface
    assert ball[1] > 0.85 and sliver[1] < 0.1  # elongation: near 1 for the (mm-)cube, near 0 for the line
    assert (
        0.6 < ball[2] < 1.5 and sliver[2] < 0.2
    )  # relative depth: about 1 at the core (over a 95th percentile), near 0 at the surface
    for name in ("depth_mm", "depth_rel", "elongation", "fill"):
        with pytest.raises(ValueError, match="spacing_mm"):
            candidates(mask, Evidence(zeros, zeros, zeros, zeros, organ), 0.004, features=(name,))
    # A verifier of the geometry alone: drops the sliver, keeps the ball.
    v = LesionVerifier((1.0, 1.0, 0.0, 0.0), 0.0, (8.0, 0.5, 0.5, 0.5), (1.0, 0.1, 1.0, 1.0), 0.5, features=GEOMETRY)
    kept = verified(mask, evidence, v, 0.004)
    assert kept[4:7, 18:30, 18:30].all() and not kept[5, 3].any()
    assert LesionVerifier.from_dict(json.loads(json.dumps(v.as_dict()))) == v
    with pytest.raises(ValueError, match="weights"):
        LesionVerifier.from_dict({**v.as_dict(), "features": list(FEATURES)})


def test_fill_tells_solid_masses_of_any_size_and_elongation_from_hollow_and_branching_ones():
    """fill: the volume over the solid ellipsoid of the same second moments, in mm on an
    anisotropic grid; near 1 for a ball, an ellipsoid and a rod (one voxel thin), low for a
    shell and a branching tree, whatever their size; elongation tells the rod apart instead."""
    spacing = (4.0, 1.0, 1.0)
    k, j, i = np.mgrid[:24, :80, :80]

    def ellipsoid(radii, centre=(12, 40, 40)):
        return sum(((a - c) * s / r) ** 2 for a, c, s, r in zip((k, j, i), centre, spacing, radii)) < 1.0

    branching = np.zeros(k.shape, bool)
    branching[12, 10:70, 39:41] = True  # a vessel-like tree: a trunk and three thin branches
    for row in (20, 40, 60):
        branching[12, row : row + 2, 40:75] = True
    shapes = {
        "small ball": ellipsoid((6, 6, 6)),
        "large ball": ellipsoid((24, 24, 24)),
        "ellipsoid": ellipsoid((8, 30, 12)),
        "rod": (k == 12) & (j == 40) & (i >= 10) & (i < 70),
        "shell": ellipsoid((24, 24, 24)) & ~ellipsoid((18, 18, 18)),
        "branching": branching,
    }
    zeros = np.zeros(k.shape, np.float32)
    evidence = Evidence(zeros, zeros, zeros, zeros, np.ones(k.shape, bool), spacing_mm=spacing)
    fill = {}
    for name, mask in shapes.items():
        _, ids, feats = candidates(mask, evidence, 0.004, features=("fill", "elongation"))
        assert len(ids) == 1, name
        fill[name] = feats[0, 0]
        if name == "rod":
            assert feats[0, 1] < 0.05  # elongation, not fill, is what tells a rod
    for name in ("small ball", "large ball", "ellipsoid", "rod"):
        assert 0.75 < fill[name] < 1.15, (name, fill[name])
    assert fill["shell"] < 0.5 and fill["branching"] < 0.5, fill
    # Too few voxels to tell a shape: 1, as elongation.
    tiny = np.zeros(k.shape, bool)
    tiny[12, 40, 40:42] = True
    assert candidates(tiny, evidence, 0.004, features=("fill",))[2][0, 0] == 1.0


def test_blob_tells_a_mass_in_the_image_from_a_vessel_and_flat_tissue():
    """blob: the share of a candidate's voxels where the image is locally a mass (bright or
    dark), on the model's anisotropic grid; a candidate on a vessel is a tube, one in flat
    tissue no shape, whether or not it touches the volume's edge."""
    spacing = (4.0, 2.75, 2.75)
    k, j, i = np.mgrid[:20, :48, :48]
    ball = ((k - 10) * 4.0) ** 2 + ((j - 16) * 2.75) ** 2 + ((i - 16) * 2.75) ** 2 <= 6.0**2
    vessel = (((k - 10) * 4.0) ** 2 + ((j - 34) * 2.75) ** 2 <= 3.0**2) & (i >= 4) & (i < 44)
    on_vessel = vessel & (i >= 16) & (i < 32)
    flat = np.zeros(k.shape, bool)
    flat[14:20, 40:48, 0:8] = True  # tissue away from both, at the volume's corner
    zeros = np.zeros(k.shape, np.float32)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):  # a bright and a dark lesion and vessel
        image = (0.5 + sign * 0.2 * (ball | vessel) + rng.normal(0, 0.0002, k.shape)).astype(np.float32)
        evidence = Evidence(zeros, zeros, zeros, zeros, np.ones(k.shape, bool), spacing_mm=spacing, image=image)
        labels, ids, feats = candidates(ball | on_vessel | flat, evidence, 0.03, features=("blob",))
        assert len(ids) == 3
        share = {
            name: feats[ids.index(int(labels[m][0])), 0]
            for name, m in (("ball", ball), ("vessel", on_vessel), ("flat", flat))
        }
        # a ball is a blob at its core (a sheet at its rim); a vessel never, nor flat tissue
        assert share["ball"] > 0.15 and share["vessel"] < 0.02 and share["flat"] < 0.02, (sign, share)
    with pytest.raises(ValueError, match="blob feature needs"):
        candidates(ball, Evidence(zeros, zeros, zeros, zeros, np.ones(k.shape, bool)), 0.03, features=("blob",))


def test_relative_depth_is_the_same_at_the_core_of_a_thin_and_of_a_thick_organ():
    """A ball at the core of a thin organ (a pancreas' 10 mm) lies shallower in mm than one
    halfway into a thick organ (a liver's 40 mm) but deeper relative to its organ: depth_rel
    measures depth in each organ's own thickness."""
    spacing = (2.0, 2.0, 2.0)

    def depth_features(half_thickness: int, offset: int):
        organ = np.zeros((30, 60, 60), bool)
        organ[15 - half_thickness : 15 + half_thickness, 5:55, 5:55] = True
        mask = np.zeros(organ.shape, bool)
        mask[15 - offset - 1 : 15 - offset + 1, 28:32, 28:32] = True
        zeros = np.zeros(organ.shape, np.float32)
        evidence = Evidence(zeros, zeros, zeros, zeros, organ, spacing_mm=spacing)
        return candidates(mask, evidence, 0.008, features=("depth_mm", "depth_rel"))[2][0]

    thin_core = depth_features(3, 0)  # 12 mm slab, the ball at its middle
    thick_mid = depth_features(12, 6)  # 48 mm slab, the ball halfway between surface and middle
    assert thin_core[0] < thick_mid[0]  # in mm the thin organ's core is shallower
    assert thin_core[1] > thick_mid[1] and thin_core[1] > 0.7  # relative to its organ, deeper


def test_verifier_drops_weak_components_and_round_trips():
    mask, evidence = two_blobs()
    weights = tuple(1.0 if name == "refined_mean" else 0.0 for name in FEATURES)
    verifier = LesionVerifier(weights, 0.0, tuple([0.0] * len(FEATURES)), tuple([1.0] * len(FEATURES)), threshold=0.6)
    kept = verified(mask, evidence, verifier, voxel_ml=0.01)
    assert kept[1:4, 1:4, 1:4].all() and not kept[8:10, 8:10, 8:10].any()
    assert LesionVerifier.from_dict(json.loads(json.dumps(verifier.as_dict()))) == verifier
    assert (verified(mask, evidence, None, 0.01) == mask).all()  # no verifier: everything kept
    with pytest.raises(ValueError, match="features"):
        LesionVerifier.from_dict({**verifier.as_dict(), "features": ["volume"]})


def test_scored_verification_gives_each_kept_voxel_its_components_probability():
    mask, evidence = two_blobs()
    weights = tuple(1.0 if name == "refined_mean" else 0.0 for name in FEATURES)
    verifier = LesionVerifier(weights, 0.0, tuple([0.0] * len(FEATURES)), tuple([1.0] * len(FEATURES)), threshold=0.5)
    kept, score = scored_verified(mask, evidence, verifier, voxel_ml=0.01)
    expected = 1.0 / (1.0 + np.exp(-np.array([(26 * 0.9 + 1.0) / 27, 0.2])))  # sigmoid of each blob's mean
    assert kept.sum() == mask.sum()  # both above 0.5
    assert np.allclose(score[1:4, 1:4, 1:4], expected[0]) and np.allclose(score[8:10, 8:10, 8:10], expected[1])
    assert not score[~mask].any()
    strict = LesionVerifier(verifier.weights, 0.0, verifier.mean, verifier.scale, threshold=0.6)
    kept, score = scored_verified(mask, evidence, strict, voxel_ml=0.01)
    assert not kept[8:10, 8:10, 8:10].any() and not score[8:10, 8:10, 8:10].any()  # dropped: no confidence
    assert np.allclose(score[1:4, 1:4, 1:4], expected[0])
    assert (kept == verified(mask, evidence, strict, 0.01)).all()
    kept, score = scored_verified(mask, evidence, None, 0.01)
    assert score is None and (kept == mask).all()


def test_a_lesion_carries_its_candidates_confidence_past_the_candidates_edge():
    from diffugts.stages.refine import lesion_confidence

    score = np.zeros((10, 10, 10), np.float32)
    score[2:4, 2:4, 2:4] = 0.7  # a kept candidate
    lesions = np.zeros(score.shape, bool)
    lesions[2:5, 2:4, 2:4] = True  # delineated one voxel past it
    lesions[8, 8, 8] = True  # a lesion that overlaps no scored voxel
    confidence = lesion_confidence(lesions, score)
    assert np.allclose(confidence[lesions & (np.arange(10)[:, None, None] < 6)], 0.7)
    assert confidence[5, 2, 2] == pytest.approx(0.7) and confidence[1, 1, 1] == pytest.approx(0.7)  # one voxel around
    assert confidence[8, 8, 8] == 0.0 and confidence[0, 0, 0] == 0.0 and confidence[2, 6, 2] == 0.0
    assert not lesion_confidence(np.zeros(score.shape, bool), score).any()


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_a_verifier_threshold_outside_0_1_is_a_one_line_error_before_anything_runs(tmp_path, capsys, value):
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "nowhere"), "--out", str(out), "--prompt", "liver tumor"]
    assert main([*args, "--verifier-threshold", value]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--verifier-threshold must lie in [0, 1]" in err and "Traceback" not in err
    assert not out.exists()


def test_deviation_candidates_are_opened_blobs_of_either_sign():
    z = np.zeros((16, 16, 16), np.float32)
    z[2:6, 2:6, 2:6] = 3.0  # a bright lesion
    z[9:13, 9:13, 9:13] = -2.5  # a dark one
    z[14, 2, 2] = 9.0  # a single noisy voxel
    z[4, 6:9, 4] = 3.0  # a one-voxel bridge toward nothing
    cand = deviation_candidates(z, 2.0)
    assert cand[3:5, 3:5, 3:5].all() and cand[10:12, 10:12, 10:12].all()
    assert not cand[14, 2, 2] and not cand[4, 7:9, 4].any()
    assert not deviation_candidates(z, 3.5).any()
    zeros, ones = tuple([0.0] * len(FEATURES)), tuple([1.0] * len(FEATURES))
    v = LesionVerifier(zeros, 0.0, zeros, ones, 0.5, candidate_source="deviation", deviation_k=2.5)
    assert LesionVerifier.from_dict(json.loads(json.dumps(v.as_dict()))) == v
    old = {k: x for k, x in v.as_dict().items() if k not in ("candidate_source", "deviation_k")}
    assert LesionVerifier.from_dict(old).candidate_source == "refined"  # verifiers fitted before the choice
    with pytest.raises(ValueError, match="candidate source"):
        LesionVerifier.from_dict({**v.as_dict(), "candidate_source": "attention"})


def test_deviation_candidates_are_the_fitting_samples_when_asked():
    """``train verifier --candidates deviation`` samples the deviation's blobs, whatever the
    head's mask (here empty) holds."""
    from diffugts.networks.refine import SHARED_CHANNELS, TARGET_CHANNELS
    from diffugts.stages.refine import DEVIATION_SCALE
    from diffugts.train.refine import Example
    from diffugts.train.verify import component_samples

    shape = (16, 16, 16)
    inputs = np.zeros((SHARED_CHANNELS + len(TARGET_CHANNELS), *shape), np.float32)
    z = np.zeros(shape, np.float32)
    z[2:6, 2:6, 2:6] = 3.0  # the lesion
    z[9:13, 9:13, 9:13] = -2.5  # anatomy that deviates
    inputs[SHARED_CHANNELS + TARGET_CHANNELS.index("deviation")] = z / DEVIATION_SCALE
    truth = np.zeros(shape, bool)
    truth[2:6, 2:6, 2:6] = True
    example = Example(inputs, truth, truth)
    none = np.zeros(shape, np.float32)
    assert component_samples([example], [none], 0.5, 0.01, 0.0) == []  # the head's mask: nothing
    samples = component_samples([example], [none], 0.5, 0.01, 0.0, source="deviation", deviation_k=2.0)
    blob = int(deviation_candidates(z, 2.0)[:8].sum())  # one blob as the opening leaves it
    assert sorted((s["lesion"], s["voxels"], s["hits"]) for s in samples) == [(False, blob, 0), (True, blob, blob)]
    verifier, _ = fit_verifier(samples * 3, 64 * 3, "deviation", 2.0)
    assert verifier.candidate_source == "deviation" and verifier.deviation_k == 2.0


def test_fitting_separates_true_from_false_components_and_never_lowers_dice():
    rng = np.random.default_rng(0)
    samples = []
    for n in range(60):
        lesion = n % 3 == 0
        feats = rng.normal(0, 1, len(FEATURES))
        feats[1] += 3.0 if lesion else 0.0  # the head is surer across true lesions
        feats[4] -= 2.0 if lesion else 0.0  # the false candidates deviate more (phantom kidney borders)
        voxels = int(rng.integers(20, 200))
        samples.append(
            {"features": feats, "lesion": lesion, "voxels": voxels, "hits": voxels // 2 if lesion else 0, "example": n}
        )
    truth = sum(s["hits"] for s in samples) + 500  # some true voxels no component found
    verifier, report = fit_verifier(samples, truth)
    assert verifier.weights[1] == max(verifier.weights)
    # Evidence may only count for a lesion: the deviation's weight is not turned against it.
    assert min(verifier.weights[1:]) >= 0.0 and verifier.weights[4] < 0.05
    assert report["kept_false_components"] < 10 and report["kept_lesion_components"] >= 15
    assert report["dice_after"] > report["dice_before"]
    with pytest.raises(ValueError, match="both"):
        fit_verifier([s for s in samples if not s["lesion"]], truth)
    # A least recall: the threshold keeps every true candidate (the best-Dice one dropped 4 of 20).
    keep_all, kept = fit_verifier(samples, truth, min_recall=1.0)
    assert kept["kept_lesion_components"] == kept["lesion_components"] == 20 and kept["min_recall"] == 1.0
    assert keep_all.threshold < verifier.threshold and kept["kept_false_components"] > report["kept_false_components"]
    # A chosen feature set: the verifier records it, and depth and compactness count only for a lesion.
    names = ("log_volume_ml", "residual_mean", "depth_mm", "elongation")
    chosen = [
        {**s, "features": np.asarray([s["features"][0], s["features"][1], -s["features"][1], s["features"][2]])}
        for s in samples
    ]
    verifier, _ = fit_verifier(chosen, truth, features=names)
    assert verifier.features == names and len(verifier.weights) == 4
    assert verifier.weights[1] > 0.5 and verifier.weights[2] == pytest.approx(0.0, abs=0.05)  # deeper = lesion only


@pytest.fixture(scope="module")
def permissive(tmp_path_factory):
    """A fused random package whose every coarse and refined voxel counts, so its refined
    masks are not empty, with its verifiers: none, keep-all, reject-all, keep-all of the
    deviation's candidates and of two normative models' (one knows the liver, one the spleen)."""
    pkg = random_package(tmp_path_factory.mktemp("verify"), fused=True)
    aova = {**pkg.network("aova"), "threshold": 0.02}
    refine = {**pkg.network("refine"), "threshold": 0.0}
    base = add_networks(
        pkg,
        {"aova": (aova, pkg.state_dict("aova")), "refine": (refine, pkg.state_dict("refine"))},
        out=pkg.root.parent / "none",
    )
    out = {"none": base}
    for name, bias, source in (
        ("keep", 50.0, "refined"),
        ("reject", -50.0, "refined"),
        ("deviation", 50.0, "deviation"),
        ("normative", 50.0, "normative"),
        ("normative-spleen", 50.0, "normative"),
        ("normative-missing", 50.0, "normative"),  # a verifier without its normative model
        ("normative-sure", 50.0, "normative"),  # seeds where the organ network's log-odds exceed 1
        ("normative-unsure", 50.0, "normative"),  # ... exceed 4
        ("keep-geometric", 50.0, "refined"),  # the geometric features computed on the study grid
        ("normative-geometric", 50.0, "normative"),  # ... on the model grid
        ("normative-continuation", 50.0, "normative"),  # and the image around each candidate
        ("normative-half", 0.0, "normative"),  # every candidate a lesion with probability 0.5
        ("normative-lookalikes", 50.0, "normative"),  # look-alikes everywhere in the liver: all dropped
        ("normative-lookalikes-elsewhere", 50.0, "normative"),  # ... in the spleen: the liver's kept
    ):
        features = FEATURES + GEOMETRY if name.endswith("geometric") else FEATURES
        features += ("continuation",) if name.endswith("continuation") else ()
        features += ("lookalikes",) if "lookalikes" in name else ()
        n = len(features)
        threshold = 0.4 if name == "normative-half" else 0.5
        verifier = LesionVerifier(
            (0.0,) * n, bias, (0.0,) * n, (1.0,) * n, threshold, features=features, candidate_source=source
        )
        if "lookalikes" in name:  # a look-alike within RADIUS of every place in the organ's box, per study
            grid = np.stack(np.meshgrid(*[np.arange(0.0, 1.05, 0.09)] * 3, indexing="ij"), -1).reshape(-1, 3)
            organ_key = "spleen/CT" if name.endswith("elsewhere") else "liver/CT"
            verifier = dataclasses.replace(
                verifier,
                weights=(0.0,) * (n - 1) + (-20.0,),  # the empty neighbourhood: 0; a look-alike per study: -78
                mean=(0.0,) * (n - 1) + (float(np.log(FLOOR)),),
                lookalikes=atlas_entry({organ_key: [grid]}, {organ_key: 1}),
            )
        networks = {"refine": ({**refine, "verifier": verifier.as_dict()}, base.state_dict("refine"))}
        if source == "normative" and name != "normative-missing":  # every voxel unlike healthy tissue
            organ = "spleen" if name.endswith("spleen") else "liver"
            n = len(NORMATIVE_FEATURES)
            mix = Mixture(np.ones(1), np.zeros((1, n)), np.eye(n)[None] * 1e-3, 0.0, 0.0)
            seed_log_odds = {"normative-sure": 1.0, "normative-unsure": 4.0}.get(name)
            model = NormativeModel(NormativeParams(seed_log_odds=seed_log_odds), {f"{organ}/CT": mix})
            networks["normative"] = (model.entry(), model.state_dict())
            if seed_log_odds is not None:
                networks["organs"] = liver_everywhere()
        out[name] = add_networks(base, networks, out=pkg.root.parent / name)
    return out


def liver_everywhere():
    """An organ network entry that knows only the liver and gives it log-odds 2 everywhere."""
    import torch

    from diffugts.networks.organs import OrganNet

    net = OrganNet(["liver"])
    with torch.no_grad():
        net.net.final_conv.weight.zero_()
        net.net.final_conv.bias.copy_(torch.tensor([0.0, 2.0]))
    return {"config": net.config}, net.state_dict()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    spec = CaseSpec(seed=11, index=0, shape=(32, 64, 64), split="seen", healthy_fraction=0.0)
    return write_case(generate_case(spec), tmp_path_factory.mktemp("case"))


def lesion_mask(out) -> np.ndarray:
    lesions = json.loads((out / "lesions" / "lesions.json").read_text())
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesions" / lesions["targets"][0]["mask"]))) > 0


@pytest.mark.slow
def test_segment_applies_the_packages_verifier(permissive, study, tmp_path):
    masks = {}
    for name, pkg in permissive.items():
        if name == "normative-missing":
            continue
        out = tmp_path / name
        assert (
            main(
                [
                    "-q",
                    "segment",
                    str(study / "dicom"),
                    "--out",
                    str(out),
                    "--model",
                    str(pkg.root),
                    "--prompt",
                    "liver tumor",
                    "--no-report",
                ]
            )
            == 0
        )
        masks[name] = lesion_mask(out)
    assert verifier_of(permissive["none"]) is None and verifier_of(permissive["keep"]) is not None
    assert masks["none"].any()  # the test means something: there is a lesion to verify
    assert (masks["keep"] == masks["none"]).all()
    assert (masks["keep-geometric"] == masks["none"]).all()  # every feature computed, nothing dropped
    assert not masks["reject"].any()
    # Deviation candidates: the lesions are the deviation's blobs in the target's organ, not
    # the refined mask (which this package's head spreads over its whole region).
    organ = attention_organ(tmp_path / "deviation")
    assert masks["deviation"].any() and not (masks["deviation"] & ~organ).any()
    assert masks["deviation"].sum() < 0.5 * masks["none"].sum()
    # Normative candidates: inside the organ (this model finds all of it unlike healthy
    # tissue; the random head's organ is the whole volume); none from a model that does not
    # know the liver, though the head's own mask is not empty.
    organ = attention_organ(tmp_path / "normative")
    assert masks["normative"].any() and not (masks["normative"] & ~organ).any()
    assert not masks["normative-spleen"].any()
    assert (masks["normative-geometric"] == masks["normative"]).all()
    assert (masks["normative-continuation"] == masks["normative"]).all()  # computed from the image, nothing dropped
    assert not masks["normative-lookalikes"].any()  # the liver's atlas, read for the liver's candidates
    assert (masks["normative-lookalikes-elsewhere"] == masks["normative"]).all()  # the spleen's is not the liver's


@pytest.mark.slow
def test_lesions_report_the_verifiers_confidence_and_the_operating_point_can_be_chosen(
    permissive, study, tmp_path, capsys
):
    """A lesion the verifier decided carries the verifier's probability as its confidence (not
    the refinement head's, which never saw it); --verifier-threshold replaces the package's."""
    pkg = permissive["normative-half"]  # probability 0.5 for every candidate, threshold 0.4
    base = ["-q", "segment", str(study / "dicom"), "--model", str(pkg.root), "--prompt", "liver tumor", "--no-report"]
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "default" / "lesions" / "lesions.json").read_text())
    lesions = summary["lesions"]
    assert lesions and all(les["confidence"] == pytest.approx(0.5) for les in lesions)
    assert "verifier_threshold" not in summary  # the model's own
    assert "confidence 0.50" in printed
    assert main([*base, "--out", str(tmp_path / "strict"), "--verifier-threshold", "0.6"]) == 0
    strict = json.loads((tmp_path / "strict" / "lesions" / "lesions.json").read_text())
    assert strict["lesions"] == [] and strict["verifier_threshold"] == 0.6  # the run's choice, recorded
    assert main([*base, "--out", str(tmp_path / "lenient"), "--verifier-threshold", "0.5"]) == 0
    lenient = json.loads((tmp_path / "lenient" / "lesions" / "lesions.json").read_text())["lesions"]
    assert [les["voxels"] for les in lenient] == [les["voxels"] for les in lesions]
    # The refine stage on files takes it too.
    d = tmp_path / "default"
    args = ["-q", "refine", str(d / "study"), "--attention", str(d / "attention"), "--synthesis", str(d / "synthesis")]
    assert main([*args, "--model", str(pkg.root), "--out", str(tmp_path / "r"), "--verifier-threshold", "0.6"]) == 0
    assert json.loads((tmp_path / "r" / "lesions.json").read_text())["lesions"] == []
    # A model without a verifier has no operating point to set: one line, nothing written.
    capsys.readouterr()
    none = str(permissive["none"].root)
    assert main([*args, "--model", none, "--out", str(tmp_path / "n"), "--verifier-threshold", "0.6"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no lesion verifier" in err and not (tmp_path / "n" / "lesions.json").exists()


@pytest.mark.slow
def test_geometric_verifiers_measure_in_the_grid_they_run_on(permissive, study, tmp_path, monkeypatch):
    """Normative candidates are verified on the model grid, the head's mask on the study grid:
    each with that grid's spacing (k, j, i), so depths and shapes are in mm (this study's grid
    has the model grid's spacing; its slices are thicker than its pixels)."""
    import diffugts.stages.verification as verification

    seen = []
    original = verification.candidates

    def spy(mask, evidence, *args, **kwargs):
        seen.append(evidence.spacing_mm)
        return original(mask, evidence, *args, **kwargs)

    monkeypatch.setattr(verification, "candidates", spy)
    spacings = {}
    for name in ("normative-geometric", "keep-geometric"):
        seen.clear()
        args = ["-q", "segment", str(study / "dicom"), "--out", str(tmp_path / name), "--no-report"]
        assert main([*args, "--model", str(permissive[name].root), "--prompt", "liver tumor"]) == 0
        assert seen, name  # the verifier ran
        spacings[name] = set(seen)
    model_kji = tuple(float(v) for v in permissive["normative-geometric"].manifest["preprocessing"]["spacing_mm"])[::-1]
    study_kji = tuple(float(v) for v in generate_case(CaseSpec(seed=11, index=0, shape=(32, 64, 64))).grid.spacing)[
        ::-1
    ]
    assert spacings["normative-geometric"] == {model_kji}
    assert spacings["keep-geometric"] == {study_kji}
    assert study_kji[0] != study_kji[1]  # anisotropic: (k, j, i) and not (x, y, z)


@pytest.mark.slow
def test_normative_candidates_are_inpainted_so_the_verifier_reads_their_residual(
    permissive, study, tmp_path, monkeypatch
):
    """No coarse region at all (a threshold above every probability): the normative candidates
    alone are the attention's masks, synthesis inpaints them, and the verifier weighs a real
    residual |x - H| there (where nothing is inpainted H = x and the residual is 0)."""
    import diffugts.stages.verification as verification

    pkg = permissive["normative"]
    blind = add_networks(
        pkg, {"aova": ({**pkg.network("aova"), "threshold": 1.5}, pkg.state_dict("aova"))}, out=tmp_path / "blind"
    )
    seen = []
    original = verification.candidates

    def spy(mask, evidence, *args, **kwargs):
        seen.append(float(np.asarray(evidence.residual)[np.asarray(mask, bool)].mean()))
        return original(mask, evidence, *args, **kwargs)

    monkeypatch.setattr(verification, "candidates", spy)
    out = tmp_path / "out"
    args = ["-q", "segment", str(study / "dicom"), "--out", str(out), "--model", str(blind.root)]
    assert main([*args, "--prompt", "liver tumor", "--no-report"]) == 0
    entry = json.loads((out / "attention" / "attention.json").read_text())["targets"][0]
    assert entry["max_probability"] < 1.5 and entry["normative_volume_ml"] > 0
    assert entry["coarse_volume_ml"] == entry["normative_volume_ml"]  # the mask is the candidates alone
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "attention" / entry["mask"]))) > 0
    inpainted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthesis" / "inpaint_mask.nii.gz"))) > 0
    assert mask.any() and not (mask & ~attention_organ(out)).any() and (mask <= inpainted).all()
    assert seen and min(seen) > 0.0  # every candidate verified with a residual
    assert lesion_mask(out).any()  # and this keep-all verifier kept them


@pytest.mark.slow
def test_refinement_verifies_the_candidates_attention_found_in_the_same_process(permissive, study, monkeypatch):
    """In one process (diffugts.core) the normative candidates are found once, by the attention
    stage; refinement from files finds the same ones again from the artifact's organs. Either
    way the verifier's evidence holds their score, the organ network's log-odds and the image
    they were scored on."""
    import diffugts.stages.attend as attend_module
    import diffugts.stages.normative as normative_module
    import diffugts.stages.verification as verification
    from diffugts.artifacts.study import Study
    from diffugts.core import Core

    calls, evidence_seen = [], []
    original, original_candidates = normative_module.target_candidates, verification.candidates

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    def spy(mask, evidence, *args, **kwargs):
        evidence_seen.append(evidence)
        return original_candidates(mask, evidence, *args, **kwargs)

    monkeypatch.setattr(normative_module, "target_candidates", counting)
    monkeypatch.setattr(attend_module, "target_candidates", counting)
    monkeypatch.setattr(verification, "candidates", spy)
    core = Core(str(permissive["normative"].root))
    prepared = core.prepare(Study.from_image(sitk.ReadImage(str(study / "volume.nii")), "CT"))
    attention = core.attend(prepared, ["liver tumor"])
    synthesis = core.synthesize(prepared, attention)
    in_process = core.refine(prepared, attention, synthesis).masks[0]
    assert len(calls) == 1 and attention.normative is not None and attention.normative[0].candidates.any()
    attention.normative = None  # as an artifact read from files carries none
    again = core.refine(prepared, attention, synthesis).masks[0]
    assert len(calls) == 2 and (again == in_process).all() and in_process.any()
    assert len(evidence_seen) == 2
    for evidence in evidence_seen:
        assert evidence.normative is not None and evidence.normative.shape == evidence.organ.shape
        assert evidence.organ_log_odds is None  # neither its seeds nor its verifier need the organ network's
        assert evidence.image is not None and evidence.image.shape == evidence.organ.shape
    assert np.array_equal(evidence_seen[0].normative, evidence_seen[1].normative)


@pytest.mark.slow
def test_a_normative_verifier_without_its_model_is_a_one_line_error(permissive, study, tmp_path, capsys):
    pkg = permissive["normative-missing"]
    args = ["-q", "segment", str(study / "dicom"), "--out", str(tmp_path / "out"), "--model", str(pkg.root)]
    assert main([*args, "--prompt", "liver tumor", "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no normative model" in err[0] and str(pkg.root) in err[0]
    assert not (tmp_path / "out" / "lesions" / "lesions.json").exists()


def attention_organ(out) -> np.ndarray:
    organs = sorted((out / "attention" / "organs").glob("*.nii.gz"))
    assert len(organs) == 1
    return sitk.GetArrayFromImage(sitk.ReadImage(str(organs[0]))) > 0


@pytest.mark.slow
def test_evaluate_scores_the_verified_mask(permissive, study):
    from diffugts.runners.evaluate import evaluate

    full = {
        name: [r for r in evaluate(study.parent, str(pkg.root), variants=("full",), show_progress=False)["rows"]]
        for name, pkg in permissive.items()
        if name in ("keep", "reject")
    }
    assert any(r["detected"] or r["false_lesions"] for r in full["keep"])
    assert all(r["detected"] == 0 and r["false_lesions"] == 0 and r["dice"] == 0.0 for r in full["reject"])
    # An operating point of the user's: recorded, named in the table, and applied.
    from diffugts.runners.evaluate import markdown

    half = str(permissive["normative-half"].root)
    own = evaluate(study.parent, half, variants=("full",), show_progress=False)
    strict = evaluate(study.parent, half, variants=("full",), show_progress=False, verifier_threshold=0.6)
    assert "verifier_threshold" not in own and strict["verifier_threshold"] == 0.6
    assert "lesion verifier at 0.6 instead of the model's" in markdown(strict)
    assert any(r["detected"] or r["false_lesions"] for r in own["rows"])
    assert all(r["detected"] == 0 and r["false_lesions"] == 0 for r in strict["rows"])


@pytest.mark.slow
def test_evaluate_adds_the_normative_candidates_as_a_variant(permissive, study):
    """A package with a normative model gets the ``normative`` row: its candidates in the
    target's organ, unverified. This model finds the whole liver interior unlike healthy tissue,
    so it touches both liver lesions; one that knows only the spleen finds nothing there."""
    from diffugts.runners.evaluate import evaluate

    assert "normative" not in evaluate(study.parent, str(permissive["none"].root), show_progress=False)["variants"]
    rows = {}
    for name in ("normative", "normative-spleen"):
        result = evaluate(study.parent, str(permissive[name].root), show_progress=False)
        assert result["variants"][-1] == "normative"
        rows[name] = {r["organ"]: r for r in result["rows"] if r["variant"] == "normative"}
    assert set(rows["normative"]) == {"liver", "kidney"}
    liver = rows["normative"]["liver"]
    assert liver["detected"] == liver["lesions"] == 2 and liver["dice"] > 0
    assert rows["normative"]["kidney"]["dice"] == 0.0 and rows["normative"]["kidney"]["false_lesions"] == 0
    assert all(r["dice"] == 0.0 and r["detected"] == 0 for r in rows["normative-spleen"].values())


@pytest.mark.slow
def test_confident_seeds_read_the_organ_networks_log_odds(permissive, study):
    """The organ network is sure of the liver at log-odds 2 everywhere: a normative model that
    seeds only above 4 finds nothing, in the full method (its verified candidates) and in the
    normative row; one that seeds above 1 finds both liver lesions in both."""
    from diffugts.runners.evaluate import evaluate

    for name, found in (("normative-sure", 2), ("normative-unsure", 0)):
        result = evaluate(study.parent, str(permissive[name].root), variants=("full", "normative"), show_progress=False)
        liver = {r["variant"]: r for r in result["rows"] if r["organ"] == "liver"}
        assert liver["normative"]["lesions"] == 2
        assert liver["normative"]["detected"] == found and liver["full"]["detected"] == found, name


def test_train_verifier_needs_a_head_that_takes_the_deviation(tmp_path, capsys):
    legacy = random_package(tmp_path, fused=False)
    code = main(["-q", "train", "verifier", "--model", str(legacy.root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "deviation" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value, message",
    [("--min-recall", "1.5", "(0, 1]"), ("--min-recall", "most", "(0, 1]"), ("--features", "depth_mm,size", "size")],
)
def test_train_verifier_options_are_checked_before_anything_runs(tmp_path, capsys, option, value, message):
    args = ["train", "verifier", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out"), option, value]
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_verifier_takes_none_for_the_best_dice_threshold():
    import argparse

    from diffugts.cli import train as train_cli
    from diffugts.train.recipe import DemoRecipe

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    args = parser.parse_args(["train", "verifier", "--model", "m", "--min-recall", "none"])
    assert args.min_recall is None and args.features == DemoRecipe.verifier_features
    assert args.cases == DemoRecipe.verifier_cases and args.healthy_cases == DemoRecipe.verifier_healthy_cases
    assert parser.parse_args(["train", "verifier", "--model", "m"]).min_recall == DemoRecipe.verifier_min_recall


@pytest.mark.slow
def test_verified_normative_candidates_are_reported_as_delineated(permissive, study, monkeypatch):
    """With a delineation (NormativeParams.delineate_above) the verifier still judges the whole
    candidates, and what a kept candidate reports is only its delineated part."""
    import diffugts.stages.verification as verification
    from diffugts.artifacts.study import Study
    from diffugts.core import Core

    judged, original_findings, original_candidates = [], NormativeModel.findings, verification.candidates

    def halved(self, *args, **kwargs):  # delineation: the candidates' voxels in even slices
        found = original_findings(self, *args, **kwargs)
        part = found.candidates.copy()
        part[1::2] = False
        return dataclasses.replace(found, delineation=part, level_delineation=None)

    def spy(mask, evidence, *args, **kwargs):
        judged.append(mask.copy())
        return original_candidates(mask, evidence, *args, **kwargs)

    core = Core(str(permissive["normative"].root))
    prepared = core.prepare(Study.from_image(sitk.ReadImage(str(study / "volume.nii")), "CT"))
    whole = core.refine(prepared, *_attend_and_synthesize(core, prepared)).masks[0]
    monkeypatch.setattr(NormativeModel, "findings", halved)
    monkeypatch.setattr(verification, "candidates", spy)
    attention, synthesis = _attend_and_synthesize(core, prepared)
    part = core.refine(prepared, attention, synthesis).masks[0]
    assert judged and np.array_equal(judged[-1], attention.normative[0].candidates)  # whole ones judged
    assert part.any() and not (part & ~whole).any() and part.sum() < 0.7 * whole.sum()


def _attend_and_synthesize(core, prepared):
    attention = core.attend(prepared, ["liver tumor"])
    return attention, core.synthesize(prepared, attention)
