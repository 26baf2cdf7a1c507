"""`diffugts train demo --quick --backbone demo`: the heads of the demo recipe on the shipped
backbone (what retrained the shipped heads), with fusion, randomised and MR grounding cases
lesion-free refinement cases, the organ grounding network and the lesion verifier recorded in the
package."""

from __future__ import annotations

import json
import sys

import pytest

from diffugts.cli import main
from diffugts.models.defaults import DEMO_MODEL
from diffugts.models.package import open_package
from diffugts.stages.normative import FEATURES as NORMATIVE_FEATURES
from diffugts.train.recipe import DemoRecipe


@pytest.mark.slow
def test_quick_heads_on_the_shipped_backbone(tmp_path, capsys, monkeypatch):
    out = tmp_path / "pkg"
    args = ["-q", "train", "demo", "--quick", "--backbone", "demo", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["diffugts", *args])
    assert main(args) == 0
    assert main(["models", "verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    shipped = open_package(DEMO_MODEL)
    assert manifest["provenance"]["backbone_from"]["sha256"] == shipped.sha256
    for name in ("vae", "unet"):  # the backbone's weights are the shipped ones, byte for byte
        assert (out / f"{name}.safetensors").read_bytes() == (DEMO_MODEL / f"{name}.safetensors").read_bytes()
    aova, refine = manifest["networks"]["aova"], manifest["networks"]["refine"]
    organs = manifest["networks"]["organs"]  # organ grounding, trained first
    assert organs["config"]["organs"][:4] == ["liver", "kidney", "spleen", "pancreas"]
    assert manifest["provenance"]["organ_training"]["steps"] == 6
    assert set(manifest["provenance"]["organ_training"]["held_out_dice"]) <= set(organs["config"]["organs"])
    assert {"anomaly_weight", "deviation_weight", "bias", "deviation"} <= set(aova["fusion"])
    assert aova["fusion"]["deviation"]["margin_mm"] == 5.0  # the recipe's unscored organ border
    assert 0.05 <= aova["threshold"] <= 0.95
    assert refine["target_channels"] == ["coarse", "deviation", "organ"]
    assert refine["config"]["in_channels"] == 11
    training = manifest["provenance"]
    assert training["aova_training"]["randomised_cases"] == 2 and training["aova_training"]["mr_healthy_cases"] == 1
    assert training["refine_training"]["healthy_cases"] == 1
    assert training["refine_training"]["false_candidate_examples"] >= 1
    # The lesion verifier is fitted on cases of its own, or the package says why it has none.
    verifying = training["verifier_training"]
    assert verifying["cases"] == 2 and verifying["healthy_cases"] == 1
    assert ("verifier" in refine) != ("not_fitted" in verifying)
    assert "--backbone demo" in training["command"]
    # The normative model: fitted after the AOVA head, on lesion-free CT and MR phantoms.
    normative = manifest["networks"]["normative"]
    assert normative["features"] == list(DemoRecipe().normative_params().features)
    assert normative["features"][:3] == list(NORMATIVE_FEATURES[:3])  # organ-relative intensity first
    assert normative["params"]["margin_mm"] == 5.0
    assert normative["params"] == DemoRecipe().normative_params().as_dict()  # the recipe sets them
    assert training["normative_training"]["cases"] == 1 and training["normative_training"]["mr_cases"] == 1
    assert set(normative["keys"]) <= set(training["normative_training"]["samples"])  # enough samples only

    assert verifying["candidate_source"] == "normative"  # the recipe's verifier takes its candidates
    if "verifier" in refine:
        assert refine["verifier"]["candidate_source"] == "normative"

    # `train normative` refits it alone.
    norm = tmp_path / "normative"
    args = ["-q", "train", "normative", "--model", str(out), "--out", str(norm), "--cases", "1", "--mr-cases", "2"]
    assert main([*args, "--seed-log-odds", "3.5", "--seed-opening", "slice", "--texture-mm", "none", "--shape"]) == 0
    assert main(["models", "verify", str(norm)]) == 0
    refitted = json.loads((norm / "manifest.json").read_text())
    assert refitted["provenance"]["normative_training"]["mr_cases"] == 2
    assert refitted["networks"]["normative"]["params"]["seed_log_odds"] == 3.5
    assert refitted["networks"]["normative"]["params"]["seed_opening"] == "slice"
    assert refitted["networks"]["normative"]["params"]["shape"] is True
    assert refitted["networks"]["normative"]["features"] == list(NORMATIVE_FEATURES)  # --texture-mm none --shape
    assert refitted["networks"]["aova"] == manifest["networks"]["aova"]  # nothing else changed

    # ... or with an anomaly discriminator, on the shipped organ network (this quick one, of 6
    # steps, finds too little organ to paint into; few MLP steps: the plumbing, not the fit)
    monkeypatch.setattr("diffugts.stages.discriminator.STEPS", 50)
    disc = tmp_path / "discriminative"
    args = ["-q", "train", "normative", "--model", str(DEMO_MODEL), "--out", str(disc), "--cases", "1"]
    assert main([*args, "--mr-cases", "1", "--score", "discriminative", "--members", "2"]) == 0
    assert main(["models", "verify", str(disc)]) == 0
    refitted = json.loads((disc / "manifest.json").read_text())
    assert refitted["networks"]["normative"]["params"]["score"] == "discriminative"
    # a committee of two, the second on cases of its own
    assert refitted["networks"]["normative"]["params"]["members"] == 2
    assert refitted["provenance"]["normative_training"]["members"] == 2
    painted = refitted["provenance"]["normative_training"]["anomaly_samples"]
    assert refitted["networks"]["normative"]["keys"] and set(refitted["networks"]["normative"]["keys"]) <= set(painted)

    # `train verifier` refits it alone, on the features asked for and lesion-free MR cases too.
    verified = tmp_path / "verified"
    args = ["-q", "train", "verifier", "--model", str(out), "--out", str(verified), "--cases", "1"]
    args += [
        "--healthy-cases",
        "1",
        "--mr-healthy-cases",
        "1",
        "--features",
        "depth_rel,elongation",
        "--min-recall",
        "0.9",
    ]
    assert main(args) == 0
    assert main(["models", "verify", str(verified)]) == 0
    refitted = json.loads((verified / "manifest.json").read_text())
    report = refitted["provenance"]["verifier_training"]
    assert report["features"] == ["depth_rel", "elongation"] and report["mr_healthy_cases"] == 1
    assert refitted["provenance"]["verifier_history"] == [verifying]  # the replaced verifier's record stays
    if "verifier" in refitted["networks"]["refine"]:
        assert refitted["networks"]["refine"]["verifier"]["features"] == ["depth_rel", "elongation"]
        assert report["min_recall"] == 0.9 and report["kept_lesion_components"] >= 0.9 * report["lesion_components"]
    else:
        assert "not_fitted" in report

    # `train organs` on a package whose head has a fusion refits it on the new organs.
    again = tmp_path / "regrounded"
    args = ["-q", "train", "organs", "--model", str(out), "--out", str(again), "--cases", "2", "--steps", "2"]
    assert main([*args, "--mr-healthy-cases", "1"]) == 0
    assert main(["models", "verify", str(again)]) == 0
    regrounded = json.loads((again / "manifest.json").read_text())
    refit = regrounded["provenance"]["organ_training"]["refitted_fusion"]
    assert refit["fusion_cases"] == 1 and refit["fusion_voxels"] > 0  # case 0 is lesion-free, case 1 not
    assert refit["fusion_margin_mm"] == 5.0  # the refit keeps the package's own border margin
    assert regrounded["networks"]["aova"]["weights"] == aova["weights"]
    assert (again / "aova.safetensors").read_bytes() == (out / "aova.safetensors").read_bytes()  # the head kept
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_train_verifier_counts_candidates_on_painted_anomalies_as_lesions(tmp_path, capsys):
    """Lesion-free CT and MR cases with generic anomalies painted into their organs give the
    verifier true candidates of no lesion type (the shipped normative model finds them), and
    the package records how many such cases it was fitted on."""
    out = tmp_path / "anomalies"
    args = ["-q", "train", "verifier", "--model", str(DEMO_MODEL), "--out", str(out), "--cases", "0"]
    args += ["--healthy-cases", "0", "--anomaly-cases", "1", "--anomaly-mr-cases", "1", "--min-recall", "0.9"]
    args += ["--lookalike-cases", "1"]  # the recipe's features read an atlas: a small one
    assert main([*args, "--grow-mm", "9"]) == 0
    assert main(["models", "verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    report = manifest["provenance"]["verifier_training"]
    assert report["anomaly_cases"] == 1 and report["anomaly_mr_cases"] == 1 and report["cases"] == 0
    assert report["lesion_components"] >= 2, report  # measured: 5 + 5 of 15 candidates
    assert report["components"] > report["lesion_components"]  # and false ones beside them
    verifier = manifest["networks"]["refine"]["verifier"]
    assert report["kept_lesion_components"] >= 0.9 * report["lesion_components"]
    assert verifier["features"] == list(DemoRecipe.verifier_features)
    assert "wrote" in capsys.readouterr().out
    # --grow-mm: fitted on candidates grown at most 9 mm, and the normative model set so, not refitted
    assert report["grow_mm"] == 9.0 and manifest["networks"]["normative"]["params"]["grow_mm"] == 9.0
    shipped = json.loads((DEMO_MODEL / "manifest.json").read_text())["networks"]["normative"]
    assert manifest["networks"]["normative"]["thresholds"] == shipped["thresholds"]
    assert (out / "normative.safetensors").read_bytes() == (DEMO_MODEL / "normative.safetensors").read_bytes()


@pytest.mark.slow
def test_train_normative_refits_only_the_organs_asked_for(tmp_path, capsys, monkeypatch):
    """`train normative --organs pancreas` on the shipped package: the pancreas's scorers and
    thresholds are new, every other organ's are the package's byte for byte, and the package
    records the partial refit; a refit whose features the other organs' fit would not match is a
    one-line error that writes nothing."""
    from safetensors.numpy import load_file

    monkeypatch.setattr("diffugts.stages.discriminator.STEPS", 50)  # the plumbing, not the fit
    out = tmp_path / "pancreas"
    # two cases per modality: one holds too few painted pancreas voxels for a fit
    args = ["-q", "train", "normative", "--model", str(DEMO_MODEL), "--cases", "2", "--mr-cases", "2"]
    assert main([*args, "--out", str(out), "--organs", "pancreas", "--min-interior", "0.5"]) == 0
    assert main(["models", "verify", str(out)]) == 0
    old = json.loads((DEMO_MODEL / "manifest.json").read_text())["networks"]["normative"]
    new = json.loads((out / "manifest.json").read_text())
    shipped = json.loads((DEMO_MODEL / "manifest.json").read_text())["provenance"]
    assert new["provenance"]["normative_refits"][-1]["organs"] == ["pancreas"]
    assert new["provenance"]["normative_training"] == shipped["normative_training"]  # the kept fit's record
    normative = new["networks"]["normative"]
    assert normative["params"]["min_interior"] == 0.5 and normative["keys"] == old["keys"]
    before, after = load_file(DEMO_MODEL / "normative.safetensors"), load_file(out / "normative.safetensors")
    assert set(before) == set(after)
    for name in before:
        kept = before[name].shape == after[name].shape and (before[name] == after[name]).all()
        if not name.startswith("pancreas/"):
            assert kept, name  # the other organs' fit, byte for byte
        elif name.endswith("net.0.weight"):
            assert not kept, name  # refitted
    for k in old["keys"]:
        assert (normative["thresholds"][k] == old["thresholds"][k]) != k.startswith("pancreas/"), k
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main([*args, "--out", str(bad), "--organs", "pancreas", "--texture-mm", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--texture-mm" in err[0] and not bad.exists()
    # a whole refit replaces every organ's fit, and with it the partial refits' records
    whole = tmp_path / "whole"
    assert main([*args, "--model", str(out), "--out", str(whole)]) == 0
    provenance = json.loads((whole / "manifest.json").read_text())["provenance"]
    assert "normative_refits" not in provenance and provenance["normative_training"]["cases"] == 2


def test_a_backbone_of_another_configuration_is_one_line_error(tmp_path, capsys):
    code = main(
        ["-q", "train", "demo", "--quick", "--config", "demo-2d", "--backbone", "demo", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "demo-2d" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("argv", "recorded"),
    [
        (["/venv/bin/diffugts", "train", "demo", "--seed", "0"], "diffugts train demo --seed 0"),
        (["/src/diffugts/__main__.py", "train", "verifier"], "diffugts train verifier"),
        (["benchmarks/train_heads.py", "0", "out dir"], "python benchmarks/train_heads.py 0 'out dir'"),
    ],
)
def test_provenance_records_the_command_that_ran(monkeypatch, argv, recorded):
    """The CLI is recorded as `diffugts ...`; a script that calls the training functions
    (benchmarks/train_heads.py) as itself, not as a diffugts command that does not exist."""
    from diffugts.train.run import command_line

    monkeypatch.setattr(sys, "argv", argv)
    assert command_line() == recorded
