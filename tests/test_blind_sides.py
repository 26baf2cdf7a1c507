"""benchmarks/blind_sides.py: the flat-blob probe of a package's normative scores."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from diffugts.models.defaults import DEMO_MODEL

bs = load_benchmark("blind_sides")
FEATURES = ("mean_1.2mm", "mean_2.5mm", "depth")


class _Scorer:
    """A stand-in scorer of the first intensity column, seed threshold 1; records what it saw."""

    high = 1.0

    def __init__(self, rule):
        self.rule, self.seen = rule, []

    def score(self, rows):
        rows = np.asarray(rows)
        self.seen.append(rows.copy())
        return self.rule(rows[:, 0])


def test_shares_are_of_rows_above_the_seed_threshold_per_signed_spread():
    rows = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    sure = _Scorer(np.abs)
    assert bs.flat_blob_shares(sure, rows, FEATURES, [4, 10]) == {4.0: 1.0, -4.0: 1.0, 10.0: 1.0, -10.0: 1.0}
    # every mean column set, the others kept as they were
    for probe in sure.seen:
        assert np.all(probe[:, 0] == probe[0, 0]) and np.all(probe[:, 1] == probe[0, 0])
        assert np.array_equal(probe[:, 2], rows[:, 2])
    # blind past 8 spreads on the bright side (healthy vessels there taught it so)
    blind = _Scorer(lambda m: np.where(m > 8.0, -5.0, np.abs(m)))
    assert bs.flat_blob_shares(blind, rows, FEATURES, [4, 10]) == {4.0: 1.0, -4.0: 1.0, 10.0: 0.0, -10.0: 1.0}
    # half the rows: a share, not a verdict
    half = _Scorer(lambda m: np.where(np.arange(len(m)) % 2 == 0, 2.0, 0.0))
    assert bs.flat_blob_shares(half, rows, FEATURES, [6])[6.0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no organ-relative mean"):
        bs.flat_blob_shares(sure, rows, ("depth", "sd_2.5mm", "x"), [4])


def test_the_table_marks_blind_sides():
    text = bs.table({"liver/CT": {4.0: 0.9, -4.0: 0.3}, "kidney/CT": {4.0: 1.0, -4.0: 0.5}}, [4])
    lines = text.splitlines()
    assert lines[0] == "| organ, modality | +4 | -4 |"
    assert lines[2] == "| kidney/CT | 1.00 | 0.50 |" and lines[3] == "| liver/CT | 0.90 | **0.30** |"


def test_a_package_without_a_normative_model_is_refused(tmp_path):
    from modelfactory import random_package

    pkg = random_package(tmp_path, fused=True)
    with pytest.raises(SystemExit, match="no normative model to probe"):
        bs.main([str(pkg.root)])


@pytest.mark.slow
def test_the_demo_model_is_probed_in_both_modalities(capsys):
    bs.main([str(DEMO_MODEL), "--cases", "1", "--spreads", "10"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "/" in line.split("|")[1]]
    keys = {line.split("|")[1].strip() for line in rows}
    assert {"liver/CT", "liver/MR", "kidney/CT", "kidney/MR"} <= keys
    for line in rows:
        shares = [float(c.strip().strip("*")) for c in line.split("|")[2:4]]
        assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)
