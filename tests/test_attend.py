"""The attention stage end to end on CPU with a random-weight demo backbone and AOVA head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from diffugts.artifacts.geometry import Geometry
from diffugts.cli import main
from diffugts.core import Core
from diffugts.models.create import create_random
from diffugts.phantom import CaseSpec, generate_case, write_case
from diffugts.stages.attend import attend
from diffugts.stages.ingest import ingest
from modelfactory import random_package


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_package(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    case_dir = write_case(generate_case(CaseSpec(seed=5, index=0, shape=(32, 64, 64))), root)
    ingest(case_dir / "dicom", root / "study", show_progress=False)
    return root / "study"


def test_attend_writes_maps_on_the_study_grid(model, study, tmp_path):
    summary = attend(study, str(model.root), ["liver tumor", "pancreatic cyst"], tmp_path / "att")
    out = tmp_path / "att"
    assert json.loads((out / "attention.json").read_text()) == summary
    ref = sitk.ReadImage(str(study / "volume.nii"))
    assert [t["prompt"]["text"] for t in summary["targets"]] == ["liver tumor", "pancreatic cyst"]
    assert summary["targets"][1]["prompt"]["organ"] == "pancreas"
    for t in summary["targets"]:
        prob = sitk.ReadImage(str(out / t["map"]))
        mask = sitk.ReadImage(str(out / t["mask"]))
        for img in (prob, mask):
            assert img.GetSize() == ref.GetSize()
            np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        p = sitk.GetArrayFromImage(prob)
        m = sitk.GetArrayFromImage(mask)
        assert 0.0 <= p.min() and p.max() <= 1.0
        np.testing.assert_array_equal(m, (p >= 0.5).astype(np.uint8))
        assert 0.0 <= t["score"] <= 1.0
    assert summary["model"]["sha256"] == model.sha256


def test_attend_is_deterministic(model, study, tmp_path):
    a = attend(study, str(model.root), ["liver tumor"], tmp_path / "a", seed=1)
    b = attend(study, str(model.root), ["liver tumor"], tmp_path / "b", seed=1)
    pa = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / a["targets"][0]["map"])))
    pb = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / b["targets"][0]["map"])))
    np.testing.assert_array_equal(pa, pb)


def test_tiled_and_whole_volume_agree(model, study, tmp_path):
    from diffugts.artifacts.study import load_study
    from diffugts.networks.text import make_target
    from diffugts.stages.attend import attention_maps
    from diffugts.stages.preprocess import to_model

    method = Core(str(model.root), "cpu").method
    s = load_study(study)
    x, _ = to_model(s.volume, s.geometry, s.modality, method.prep)
    whole, _ = attention_maps(method, x, method.prep.spacing_mm, [make_target("liver tumor")])
    method.package.manifest["inference"] = {"roi_size": [32, 48, 48]}
    tiled, _ = attention_maps(method, x, method.prep.spacing_mm, [make_target("liver tumor")])
    # Tiles see less context, so maps differ a little, not in substance.
    assert np.abs(whole - tiled).mean() < 0.05


def test_cli_errors_are_one_line(model, tmp_path, capsys):
    assert (
        main(["attend", str(tmp_path), "--model", str(model.root), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a study artifact" in err[0]


def test_model_without_head_is_a_clear_error(study, tmp_path, capsys):
    pkg = create_random(tmp_path / "bare", "demo", seed=0)
    assert (
        main(["attend", str(study), "--model", str(pkg.root), "--prompt", "liver tumor", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "no trained aova head" in capsys.readouterr().err


def test_geometry_helper_round_trip():
    g = Geometry((1, 2, 3), (0.5, 0.5, 2), np.diag([-1.0, 1, 1]), (4, 5, 6))
    assert Geometry.from_dict(g.as_dict()).allclose(g)
