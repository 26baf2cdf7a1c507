"""benchmarks/verifier_proxy.py: the offline proxy of `evaluate` for normative verifiers, on the
shipped demo model and phantom folders; the example maker's no-synthesis mode it rests on; and
benchmarks/candidate_curve.py, its sibling for the candidate stage before any verifier."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from diffugts.cli import main as cli
from diffugts.models.defaults import DEMO_MODEL
from diffugts.models.package import open_package

vp = load_benchmark("verifier_proxy")
cc = load_benchmark("candidate_curve")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dev")
    args = ["-q", "phantom", "--seed", "5104", "--split", "seen", "--healthy-fraction", "0", "--no-dicom"]
    assert cli([*args, "--n", "2", "--out", str(root / "dev" / "ct-seen")]) == 0
    assert (
        cli(
            [
                "-q",
                "phantom",
                "--n",
                "1",
                "--seed",
                "5132",
                "--healthy",
                "--no-dicom",
                "--out",
                str(root / "dev" / "healthy-ct"),
            ]
        )
        == 0
    )
    return [root / "dev" / "ct-seen", root / "dev" / "healthy-ct"]


@pytest.mark.slow
def test_the_proxy_keeps_what_a_verifier_keeps_and_counts_as_evaluate_does(folders, capsys, tmp_path):
    make = vp.maker(open_package(DEMO_MODEL), 0)
    rows, targets, healthy = vp.folder_candidates(make, folders)
    assert dict(healthy) == {"dev/ct-seen": 0, "dev/healthy-ct": 1}
    lesion_targets = [t for t in targets if not t["healthy"]]
    assert lesion_targets and all(t["lesions"] for t in lesion_targets)
    assert len([t for t in targets if t["healthy"]]) == 4  # every host organ of the lesion-free study
    assert rows and all(r["hits"] <= r["voxels"] and r["touched"] <= set(targets[r["target"]]["lesions"]) for r in rows)
    every = vp.proxy(rows, targets, healthy, None)
    dice, found, total = every["dev/ct-seen"]
    assert 0.0 < dice <= 1.0 and 0 < found <= total == sum(len(t["lesions"]) for t in lesion_targets)
    assert every["dev/healthy-ct"] == sum(1 for r in rows if targets[r["target"]]["healthy"])  # per 1 study
    from diffugts.stages.verification import verifier_of

    verified = vp.proxy(rows, targets, healthy, verifier_of(open_package(DEMO_MODEL)))
    assert verified["dev/ct-seen"][1] <= found and verified["dev/healthy-ct"] <= every["dev/healthy-ct"]
    # a verifier whose threshold nothing reaches keeps nothing
    strict = vp.LesionVerifier(
        (1.0,), -50.0, (0.0,), (1.0,), 0.99, features=("depth_rel",), candidate_source="normative"
    )
    assert vp.proxy(rows, targets, healthy, strict) == {"dev/ct-seen": (0.0, 0, total), "dev/healthy-ct": 0.0}

    # the trade-off curve: what the verifier keeps at each threshold, as proxy() counts it
    own = verifier_of(open_package(DEMO_MODEL))
    points = vp.curve(rows, targets, healthy, own)
    assert [p[0] for p in points] == list(vp.CURVE_THRESHOLDS) and all(p[2] == total for p in points)
    assert all(a[1] >= b[1] and a[3] >= b[3] for a, b in zip(points, points[1:]))  # stricter keeps less
    assert points[0][1] > points[-1][1] or points[0][3] > points[-1][3]
    for t, kept, _, false in points[::6]:
        at = vp.proxy(rows, targets, healthy, dataclasses.replace(own, threshold=t))
        assert (kept, false) == (at["dev/ct-seen"][1], at["dev/healthy-ct"])

    args = [str(DEMO_MODEL), *map(str, folders), "--fit", "1,1,0,0,0", "--fit", "2,1,0,0,0"]
    vp.main([*args, "--features", "depth_rel,elongation", "--curve", "--cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    sha = open_package(DEMO_MODEL).sha256[:12]
    assert "| none (every candidate) |" in out and f"| the package's ({sha}) |" in out
    assert "| depth_rel,elongation (fit 1,1,0,0,0, threshold" in out and "(fit 2,1,0,0,0, threshold" in out
    assert "by threshold" in out and f"- the package's ({sha}): 0.05: " in out and "- depth_rel,elongation (" in out
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3  # the candidates and each fit's samples
    vp.main([*args, "--features", "depth_rel,elongation", "--curve", "--cache", str(tmp_path / "cache")])
    again = capsys.readouterr().out  # read back from the cache: the same figures, and no case made again
    assert again == "".join(line for line in out.splitlines(keepends=True) if "candidates so far" not in line)


@pytest.mark.slow
def test_the_proxy_reads_the_lookalike_atlas_it_is_given(folders, capsys, tmp_path, monkeypatch):
    """With ``--lookalike-cases`` the proxy makes the atlas (here a stand-in with a look-alike
    near every place of every organ), caches it, and every candidate's ``lookalikes`` reads it;
    without one the feature is the empty neighbourhood's."""
    from diffugts.stages.lookalikes import FLOOR, atlas_entry
    from diffugts.stages.verification import KNOWN_FEATURES

    grid = np.stack(np.meshgrid(*[np.arange(0.0, 1.05, 0.09)] * 3, indexing="ij"), -1).reshape(-1, 3)
    keys = [f"{o}/CT" for o in ("liver", "kidney", "spleen", "pancreas")]
    atlas = atlas_entry({k: [grid] for k in keys}, {k: 1 for k in keys})
    made = []
    monkeypatch.setattr(vp, "lookalike_atlas", lambda make, n: made.append(n) or atlas)
    column = KNOWN_FEATURES.index("lookalikes")
    make = vp.maker(open_package(DEMO_MODEL), 0)
    rows, _, _ = vp.folder_candidates(make, folders, atlas)
    assert rows and all(r["features"][column] >= np.log(1 + FLOOR) - 1e-9 for r in rows)
    plain, _, _ = vp.folder_candidates(make, folders)
    assert all(r["features"][column] == pytest.approx(np.log(FLOOR)) for r in plain)
    # a verifier reads lookalikes from the atlas it carries, whichever atlas the rows were made with
    weighs = vp.LesionVerifier((1.0,), 0.0, (0.0,), (1.0,), 0.5, features=("lookalikes",), candidate_source="normative")
    carried = vp.verifier_features(plain, dataclasses.replace(weighs, lookalikes=atlas))[:, 0]
    assert carried == pytest.approx([r["features"][column] for r in rows])
    assert vp.verifier_features(rows, weighs)[:, 0] == pytest.approx([r["features"][column] for r in rows])
    args = [str(DEMO_MODEL), *map(str, folders), "--fit", "1,1,0,0,0", "--lookalike-cases", "2"]
    vp.main([*args, "--features", "core_ml,lookalikes", "--cache", str(tmp_path / "cache")])
    assert made == [2] and "| core_ml,lookalikes (fit 1,1,0,0,0, threshold" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3  # the atlas, the candidates, the fit's samples
    vp.main([*args, "--features", "core_ml,lookalikes", "--cache", str(tmp_path / "cache")])
    assert made == [2]  # read back from the cache
    # the package's row is its verifier as shipped: its own atlas, not the one the proxy made
    sha = open_package(DEMO_MODEL).sha256[:12]
    rows_of, _ = {}, capsys.readouterr()
    for extra in ([], ["--lookalike-cases", "2"]):
        vp.main([str(DEMO_MODEL), *map(str, folders), *extra, "--cache", str(tmp_path / "cache")])
        rows_of[bool(extra)] = [
            line for line in capsys.readouterr().out.splitlines() if line.startswith("| the package's")
        ]
    assert rows_of[False] == rows_of[True] and len(rows_of[True]) == 1 and sha in rows_of[True][0]


@pytest.mark.slow
def test_the_proxy_counts_candidates_as_the_package_reports_them(folders, tmp_path):
    """A package that delineates by level (the shipped one) counts each candidate's delineated
    voxels; the same package reporting whole candidates counts them as cut, with the same
    candidates and features."""
    assert open_package(DEMO_MODEL).network("normative")["params"]["delineate_level"] is not None
    assert (
        cli(["train", "delineation", "--model", str(DEMO_MODEL), "--out", str(tmp_path / "cut"), "--level", "none"])
        == 0
    )
    delineated = vp.folder_candidates(vp.maker(open_package(DEMO_MODEL), 0), folders[:1])[0]
    cut = vp.folder_candidates(vp.maker(open_package(tmp_path / "cut"), 0), folders[:1])[0]
    assert len(delineated) == len(cut) > 0
    assert all(np.array_equal(a["features"], b["features"]) for a, b in zip(delineated, cut))
    assert any(a["voxels"] != b["voxels"] for a, b in zip(delineated, cut))
    assert all(a["voxels"] > 0 for a in delineated)


def test_the_cache_makes_once_and_reads_back_what_was_made(tmp_path):
    made = []

    def make(n):
        made.append(n)
        return [{"touched": {3, 1}, "features": np.arange(n, dtype=np.float32)}], [{"truth": 2}], {"g": 1}

    first = vp.cached(tmp_path / "c", ["key", 1], make, 2)
    again = vp.cached(tmp_path / "c", ["key", 1], make, 2)
    assert made == [2] and first == again
    assert again[0][0]["touched"] == {1, 3} and list(again[0][0]["features"]) == [0.0, 1.0]
    vp.cached(tmp_path / "c", ["key", 2], make, 2)  # another key: made again
    vp.cached(None, ["key", 1], make, 5)  # no cache: always made
    assert made == [2, 2, 5] and not list((tmp_path / "c").glob("*.tmp"))


def test_the_proxy_needs_a_normative_model(tmp_path):
    from modelfactory import random_package

    pkg = random_package(tmp_path, fused=True)
    with pytest.raises(SystemExit, match="normative model"):
        vp.maker(pkg, 0)


@pytest.mark.slow
def test_examples_without_synthesis_hold_the_same_candidates(tmp_path):
    """synthesize=False changes the residual only: the random draws, and so the candidates and
    the normative evidence, are those of the examples made with synthesis."""
    from diffugts.models.package import open_package
    from diffugts.stages.normative import normative_of
    from diffugts.train.run import _ExampleMaker

    pkg = open_package(DEMO_MODEL)
    made = []
    for synthesize in (True, False):
        make = _ExampleMaker(pkg, 0, 2, None, normative=normative_of(pkg), synthesize=synthesize)
        made.append(make.examples(make.case(4000, False)))
    assert len(made[0]) == len(made[1]) > 0
    for a, b in zip(*made):
        assert np.array_equal(a.normative, b.normative) and np.array_equal(a.truth, b.truth)
        assert np.array_equal(a.findings.score, b.findings.score)
    assert any(not np.array_equal(a.inputs, b.inputs) for a, b in zip(*made))  # the residual differs


@pytest.mark.slow
def test_the_candidate_curve_recuts_the_package_candidates(folders):
    """Seeds moved along the relative score: at 0 the package's own candidates, stricter seeds
    a subset of them, looser a superset; the curve counts the unverified candidates as the proxy
    does in lesion-free studies."""
    make = vp.maker(open_package(DEMO_MODEL), 0)
    spacing = tuple(make.prep.spacing_mm)[::-1]
    cut = 0
    for _, _, _, _, targets in vp.folder_cases(make, folders):
        for _, ex in targets:
            if ex is None or ex.findings is None:
                continue
            at = {s: make.normative.reseeded(ex.findings, spacing, s) for s in (-0.5, 0.0, 0.5)}
            assert np.array_equal(at[0.0], ex.findings.candidates) and np.array_equal(at[0.0], ex.normative)
            assert not (at[0.5] & ~at[0.0]).any() and not (at[0.0] & ~at[-0.5]).any()
            cut += 1
    assert cut
    results = cc.curve(make, folders, [0.0, 50.0])
    rows, targets, healthy = vp.folder_candidates(make, folders)
    every = vp.proxy(rows, targets, healthy, None)
    ct, free = results[0.0]["dev/ct-seen"], results[0.0]["dev/healthy-ct"]
    assert ct[1] == every["dev/ct-seen"][2] and every["dev/ct-seen"][1] <= ct[0] <= ct[1]
    assert free[3] == 1 and free[2] == every["dev/healthy-ct"] and free[0] == free[1] == 0
    assert results[50.0]["dev/ct-seen"][0] == 0 and results[50.0]["dev/healthy-ct"][2] == 0  # nothing seeds
    text = cc.table(results)
    assert "| +0.00 |" in text and "| +50.00 |" in text and "CT lesions, false per lesion-free study" in text
    assert f"| {ct[0]}/{ct[1]} | {free[2]:.2f} per study | {ct[0]}/{ct[1]}, {free[2]:.2f} |" in text


def test_touched_counts_lesions_and_the_components_that_miss_them():
    mask = np.zeros((1, 5, 12), bool)
    mask[0, 1:3, 0:2] = True  # on lesion 4
    mask[0, 1:3, 4:6] = True  # on nothing
    mask[0, 1, 8] = True  # too small to count
    mask[0, 1:3, 10:12] = True  # on lesion 9, which the target does not prompt for
    lesions = np.zeros(mask.shape, np.int16)
    lesions[0, 2, 1], lesions[0, 1, 8], lesions[0, 2, 11] = 4, 7, 9
    assert cc.touched(mask, lesions, [4, 7], 4) == ({4}, 2)
    assert cc.touched(mask, lesions, [4, 7, 9], 1) == ({4, 7, 9}, 1)
