"""Evaluation on datasets gives the phantom path's figures on the same cases, grouped per
dataset and lesion type, with the paper's figures beside ours."""

from __future__ import annotations

import json

import pytest

import datasetfactory as F
from diffugts.cli import main
from diffugts.datasets import EvalCases, open_dataset
from diffugts.phantom import CaseSpec, generate_case
from diffugts.runners.evaluate import evaluate
from modelfactory import random_package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cases = F.make_cases(range(3), split="any")[:2]
    cases.append(generate_case(CaseSpec(seed=41, index=90, shape=F.SHAPE, healthy=True)))
    model = random_package(root / "model", fused=True)
    return {
        "root": root,
        "cases": cases,
        "model": str(model.root),
        "phantoms": F.write_phantom_folder(root / "phantoms", cases),
        "msd": F.write_msd(root / "msd", cases),
        "mapping": F.write_mapping(root / "mapping.json", name="kits23"),
    }


def _key(row):
    return row["case"], row["organ"], row["variant"]


def _strip(rows):
    return sorted(({k: v for k, v in r.items() if k != "dataset"} for r in rows), key=_key)


def test_dataset_rows_equal_the_phantom_rows_on_the_same_cases(world):
    phantom = evaluate(world["phantoms"], world["model"], show_progress=False)
    ds = open_dataset(world["msd"], world["mapping"], seen_types=F.SEEN_TYPES)
    result = evaluate(None, world["model"], show_progress=False, cases=EvalCases(ds), datasets=[ds.provenance()])
    assert result["cases"] == phantom["cases"] == 3
    assert phantom["rows"] and phantom["healthy_rows"]
    assert _strip(result["rows"]) == _strip(phantom["rows"])
    assert _strip(result["healthy_rows"]) == _strip(phantom["healthy_rows"])
    assert {r["dataset"] for r in result["rows"] + result["healthy_rows"]} == {"kits23"}
    # Per dataset and split, per dataset and lesion type; the lesion-free study per dataset.
    splits = {r["split"] for r in result["rows"]}
    assert set(result["by_dataset"]["dataset_split"]) == {f"kits23 / {s}" for s in splits}
    types = {r["lesion_type"] for r in result["rows"]}
    assert set(result["by_dataset"]["dataset_type"]) == {f"kits23 / {t}" for t in types}
    assert result["healthy_by_dataset"]["kits23"]["full"]["studies"] == 1
    full = [r["dice"] for r in result["rows"] if r["variant"] == "full"]
    cell = result["by_dataset"]["dataset_split"]
    assert sum(c["full"]["n"] for c in cell.values()) == len(full)


def test_cli_evaluate_dataset_writes_json_and_markdown_with_the_paper_figures(world, capsys):
    out = world["root"] / "out"
    rc = main(
        [
            "-q",
            "evaluate",
            "--dataset",
            str(world["msd"]),
            "--mapping",
            str(world["mapping"]),
            "--seen",
            "hypodense",
            "--seen",
            "cystic",
            "--seen",
            "hyperenhancing",
            "--model",
            world["model"],
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["datasets"][0]["name"] == "kits23"
    assert result["datasets"][0]["seen_types"] == ["cystic", "hyperenhancing", "hypodense"]
    assert sorted(result["datasets"][0]["cases"]) == sorted(c.spec.case_id for c in world["cases"])
    md = (out / "evaluation.md").read_text()
    assert "Dice % (paper, DiffuGTS)" in md
    # KiTS23's figure from the paper sits beside ours on every kits23 line.
    lines = [line for line in md.splitlines() if line.startswith(("| kits23 | seen |", "| kits23 | unseen |"))]
    assert lines and all(line.rstrip(" |").endswith("59.80") for line in lines)
    assert "### By dataset and lesion type" in md
