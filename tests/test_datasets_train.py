"""Training the heads on datasets: the cases reach training as the phantom path makes them,
only seen lesion types, provenance in the manifest, resumable checkpoints."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import datasetfactory as F
from diffugts.cli import main
from diffugts.datasets import open_dataset, to_training_case
from diffugts.datasets.protocol import split_cases
from diffugts.datasets.training import DatasetSource
from diffugts.models.package import open_package
from diffugts.stages.preprocess import Preprocessing
from diffugts.train.checkpoint import Checkpoint
from diffugts.train.data import case_from_dir
from diffugts.train.run import train_aova_head, train_refine_head
from modelfactory import FEATURES, random_package

pytestmark = pytest.mark.slow

AOVA = dict(cases=0, steps=4, dim=8, features=FEATURES, show_progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    seen = F.make_cases(range(8), split="seen")[:4]
    unseen = F.make_cases(range(8), seed=43, split="unseen", organs=("liver",))[:1]
    assert len(seen) == 4 and unseen and all(r["split"] == "unseen" for r in unseen[0].lesions)
    return {
        "root": root,
        "seen": seen,
        "unseen": unseen,
        "msd": F.write_msd(root / "msd", seen + unseen),
        "mapping": F.write_mapping(root / "mapping.json"),
        "phantoms": F.write_phantom_folder(root / "phantoms", seen),
        "backbone": random_package(root / "models", heads=False),
        "fused": random_package(root / "models2", fused=True),
    }


def _dataset(world):
    return open_dataset(world["msd"], world["mapping"], seen_types=F.SEEN_TYPES)


def test_a_dataset_case_reaches_training_as_the_phantom_folder_case_does(world):
    prep = Preprocessing.from_dict(world["backbone"].manifest["preprocessing"])
    ds = _dataset(world)
    for case in world["seen"]:
        ours = to_training_case(ds.load(case.spec.case_id), prep)
        theirs = case_from_dir(world["phantoms"] / case.spec.case_id, prep)
        assert np.array_equal(ours.x, theirs.x)
        assert np.array_equal(ours.lesions > 0, theirs.lesions > 0)
        for family in ("liver", "kidney"):
            mine = np.isin(ours.organs, [k for k, v in ours.organ_names.items() if family in v])
            phantom = np.isin(theirs.organs, [k for k, v in theirs.organ_names.items() if family in v])
            # A lesion is part of its host's region in both (case_features adds it for phantoms).
            lesion = theirs.lesions > 0
            assert np.array_equal(mine & ~lesion, phantom & ~lesion)
        assert sorted((r["type"], r["voxels"]) for r in ours.records) == sorted(
            (r["type"], r["voxels"]) for r in theirs.records
        )


def test_aova_training_on_dataset_cases_equals_training_on_the_same_phantom_cases(world):
    """Same cases, same seed: the same head, step for step. Cases whose lesions share one type
    and host (a label map without instance ids cannot say in which order a phantom placed
    lesions of different types, and the prompt draws follow that order)."""
    from diffugts.networks.backbones import load_backbone
    from diffugts.networks.text import TextEncoder
    from diffugts.train.aova import organ_family, train_aova

    prep = Preprocessing.from_dict(world["backbone"].manifest["preprocessing"])
    single = [c for c in world["seen"] if len({(r["type"], organ_family(r["organ"])) for r in c.lesions}) == 1]
    assert len(single) >= 2
    ds = _dataset(world)
    ours = [to_training_case(ds.load(c.spec.case_id), prep) for c in single]
    theirs = [case_from_dir(world["phantoms"] / c.spec.case_id, prep) for c in single]
    backbone, text = load_backbone(world["backbone"], "cpu"), TextEncoder()
    runs = [
        train_aova(
            backbone, text, data, feature_names=FEATURES, spacing=prep.spacing_mm, steps=5, dim=8, show_progress=False
        )
        for data in (ours, theirs)
    ]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    a, b = runs[0].head.state_dict(), runs[1].head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_aova_training_on_a_dataset_records_its_provenance_and_skips_unseen_types(world, tmp_path):
    source = DatasetSource([_dataset(world)], held_out_fraction=0.3, show_progress=False)
    pkg = train_aova_head(world["backbone"].root, tmp_path / "out", source=source, **AOVA)
    record = pkg.manifest["provenance"]["aova_training"]["datasets"]
    entry = record["datasets"][0]
    assert entry["name"] == "phantom-set" and entry["layout"] == "msd"
    assert entry["mapping"]["sha256"] == hashlib.sha256(world["mapping"].read_bytes()).hexdigest()
    assert entry["seen_types"] == sorted(F.SEEN_TYPES)
    assert entry["skipped_unseen"] == [world["unseen"][0].spec.case_id]
    used = entry["training_cases"] + entry["held_out_cases"]
    assert sorted(used) == sorted(c.spec.case_id for c in world["seen"])
    assert entry["training_cases"] and entry["held_out_cases"]
    assert pkg.manifest["provenance"]["aova_training"]["held_out_seen_dice"] is not None
    assert "aova" in pkg.manifest["networks"]


def _weights(pkg, name):
    return load_file(str(pkg.root / pkg.manifest["networks"][name]["weights"]))


def test_an_interrupted_aova_run_resumes_to_the_uninterrupted_weights(world, tmp_path):
    source = lambda: DatasetSource([_dataset(world)], show_progress=False)  # noqa: E731
    whole = train_aova_head(world["backbone"].root, tmp_path / "whole", source=source(), **{**AOVA, "steps": 6})
    ck = Checkpoint(tmp_path / "resumed" / ".checkpoints" / "aova.pt", {"run": 1}, every=2)
    train_aova_head(world["backbone"].root, tmp_path / "resumed", source=source(), checkpoint=ck, **AOVA)
    assert ck.path.is_file() and torch.load(ck.path, weights_only=True)["step"] == 4
    ck = Checkpoint(ck.path, {"run": 1}, every=2)
    resumed = train_aova_head(
        world["backbone"].root, tmp_path / "resumed", source=source(), checkpoint=ck, **{**AOVA, "steps": 6}
    )
    assert ck.resumed_from == 4
    a, b = _weights(whole, "aova"), _weights(resumed, "aova")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint of other training is not resumed.
    other = Checkpoint(ck.path, {"run": 2}, every=2)
    train_aova_head(world["backbone"].root, tmp_path / "other", source=source(), checkpoint=other, **AOVA)
    assert other.resumed_from == 0


def test_refine_training_on_a_dataset(world, tmp_path, monkeypatch):
    import diffugts.train.refine as train_refine

    calls = []
    calibrate = train_refine.calibrate_threshold
    monkeypatch.setattr(
        train_refine, "calibrate_threshold", lambda probs, held: calls.append(len(held)) or calibrate(probs, held)
    )
    source = DatasetSource([_dataset(world)], show_progress=False)
    pkg = train_refine_head(
        world["fused"].root, tmp_path / "out", cases=0, steps=3, synthesis_steps=2, show_progress=False, source=source
    )
    # The threshold is calibrated on a validation slice of the dataset's training cases (no
    # lesion-free phantoms asked for), never on its held-out cases, which evaluation scores.
    assert len(calls) == 1 and calls[0] > 0
    training = pkg.manifest["provenance"]["refine_training"]
    assert training["examples"] > 0
    entry = training["datasets"]["datasets"][0]
    seen = sorted(c.spec.case_id for c in world["seen"])
    held = [c for c in split_cases(_dataset(world), source.held_out_fraction)[1] if c in seen]
    assert held and entry["held_out_cases"] == []  # read by evaluation only
    assert sorted(entry["training_cases"] + held) == seen
    assert len(training["threshold_cases"]) == 1  # "dataset/case"
    assert training["threshold_cases"][0].startswith(f"{entry['name']}/")
    assert training["threshold_cases"][0].split("/", 1)[1] in entry["training_cases"]
    assert entry["skipped_unseen"] == [world["unseen"][0].spec.case_id]


def test_cli_train_aova_on_a_dataset_mixed_with_phantoms(world, tmp_path):
    out = tmp_path / "pkg"
    rc = main(
        [
            "-q",
            "train",
            "aova",
            "--model",
            str(world["backbone"].root),
            "--out",
            str(out),
            "--cases",
            "1",
            "--steps",
            "3",
            "--dim",
            "8",
            "--randomised-cases",
            "0",
            "--mr-healthy-cases",
            "0",
            "--fusion-recall",
            "0",
            "--features",
            ",".join(FEATURES),
            "--dataset",
            str(world["msd"]),
            "--mapping",
            str(world["mapping"]),
            "--seen",
            "hypodense",
            "--seen",
            "hyperenhancing",
            "--seen",
            "cystic",
            "--checkpoint-every",
            "1",
        ]
    )
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    training = manifest["provenance"]["aova_training"]
    assert training["cases"] == 1 and training["datasets"]["datasets"][0]["name"] == "phantom-set"
    assert not (out / ".checkpoints").exists()  # removed once the package is written
    assert open_package(out).network("aova")


def test_evaluate_reads_the_seen_types_from_the_manifest(world, tmp_path):
    from diffugts.datasets.run import trained_types

    assert trained_types(world["backbone"].root) == []
    source = DatasetSource(
        [open_dataset(world["msd"], world["mapping"], seen_types=["hypodense"])], show_progress=False
    )
    pkg = train_aova_head(world["backbone"].root, tmp_path / "out", source=source, **{**AOVA, "steps": 1})
    assert trained_types(pkg.root) == ["hypodense"]
    # Evaluating that dataset again never scores the cases that trained the model.
    from diffugts.datasets.run import without_trained

    trained = pkg.manifest["provenance"]["aova_training"]["datasets"]["datasets"][0]["training_cases"]
    ds = open_dataset(world["msd"], world["mapping"])
    sets, excluded = without_trained(pkg.root, [("evaluate", ds)])
    assert trained and excluded == {ds.name: len(trained)}
    assert sorted(sets[0][1].case_ids) == sorted(c for c in ds.case_ids if c not in trained)


def test_cli_refuses_datasets_and_a_protocol_together(world, capsys):
    rc = main(
        [
            "-q",
            "train",
            "aova",
            "--model",
            str(world["backbone"].root),
            "--dataset",
            str(world["msd"]),
            "--mapping",
            str(world["mapping"]),
            "--protocol",
            "paper-protocol",
        ]
    )
    assert rc == 2 and "give one or the other" in capsys.readouterr().err
    rc = main(
        [
            "-q",
            "train",
            "refine",
            "--model",
            str(world["fused"].root),
            "--dataset",
            str(world["msd"]),
            "--mapping",
            str(world["mapping"]),
            "--held-out-fraction",
            "1.5",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--held-out-fraction 1.5" in err[0]
