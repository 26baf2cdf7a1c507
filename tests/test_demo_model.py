"""The shipped demo model: intact, reproducible from its recorded command, and not worse than
it was when it was committed (a quick regression check on a handful of phantom cases).

The floors sit below the figures measured when the model was committed (docs/benchmarks.md)
so that noise does not trip them; a retrained or broken model that loses the ability to find
lesions does. Regression cases: seed 9500 (evaluation range, never used by training).
"""

from __future__ import annotations

import json

import pytest

from diffugts.cli import main
from diffugts.evaluate import evaluate
from diffugts.models.defaults import DEMO_MODEL, default_model
from diffugts.phantom import CaseSpec, generate_case, write_case

# Measured at commit time on these cases (full method): see docs/benchmarks.md.
FLOOR_FULL_DICE = 0.12  # measured 0.197 (4 lesion-bearing organs)
FLOOR_FULL_DETECTION = 0.25  # measured 0.40


def test_demo_model_is_the_default_verifies_and_fits_the_budget(capsys, monkeypatch):
    monkeypatch.delenv("DIFFUGTS_MODEL", raising=False)
    assert default_model() == str(DEMO_MODEL)
    assert main(["models", "verify", str(DEMO_MODEL)]) == 0
    assert "OK" in capsys.readouterr().out
    size = sum(p.stat().st_size for p in DEMO_MODEL.iterdir())
    assert size <= 30 * 1024 * 1024
    manifest = json.loads((DEMO_MODEL / "manifest.json").read_text())
    provenance = manifest["provenance"]
    assert provenance["command"] == "diffugts train demo --out src/diffugts/data/models/demo --seed 0"
    assert provenance["recipe"]["seed"] == 0
    assert {"backbone_training", "aova_training", "refine_training"} <= set(provenance)


@pytest.fixture(scope="module")
def regression_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression")
    for index in range(3):
        spec = CaseSpec(seed=9500, index=index, split="seen", healthy_fraction=0.0)
        write_case(generate_case(spec), root, dicom=False)
    return root


def test_demo_model_stays_above_its_floor(regression_cases):
    result = evaluate(regression_cases, str(DEMO_MODEL), show_progress=False)
    full = result["summary"]["split"]["seen"]["full"]
    assert full["n"] >= 3
    assert full["dice"] >= FLOOR_FULL_DICE, full
    assert full["detection"] >= FLOOR_FULL_DETECTION, full
