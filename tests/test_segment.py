"""Refinement, `diffugts segment` end to end, and `diffugts evaluate`, with random-weight
models (the mechanics and the geometry; quality is the demo model's business)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from diffugts.artifacts.geometry import Geometry
from diffugts.cli import main
from diffugts.phantom import CaseSpec, generate_case, write_case
from diffugts.runners.evaluate import dice, evaluate, intensity_baseline, markdown, nsd, summarise_healthy
from diffugts.stages.refine import body_mask
from modelfactory import random_package


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_package(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    spec = CaseSpec(seed=11, index=0, shape=(32, 64, 64), split="seen", healthy_fraction=0.0)
    return write_case(generate_case(spec), tmp_path_factory.mktemp("case"))


def test_segment_end_to_end(model, case, tmp_path, capsys):
    out = tmp_path / "seg"
    code = main(
        [
            "-q",
            "segment",
            str(case / "dicom"),
            "--out",
            str(out),
            "--model",
            str(model.root),
            "--prompt",
            "liver tumor",
            "--prompt",
            "kidney cyst",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "'liver tumor':" in printed and "'kidney cyst':" in printed and "report.html" in printed
    for marker in (
        "study/series.json",
        "attention/attention.json",
        "synthesis/synthesis.json",
        "lesions/lesions.json",
        "report/report.json",
    ):
        assert (out / marker).is_file(), marker
    lesions = json.loads((out / "lesions" / "lesions.json").read_text())
    assert [t["prompt"]["text"] for t in lesions["targets"]] == ["liver tumor", "kidney cyst"]
    # Masks are on the exact grid of the source series.
    ref = sitk.ReadImage(str(out / "study" / "volume.nii"))
    for t in lesions["targets"]:
        m = sitk.ReadImage(str(out / "lesions" / t["mask"]))
        assert m.GetSize() == ref.GetSize()
        np.testing.assert_allclose(m.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        # Nothing outside the region synthesis was allowed to change.
        inpainted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthesis" / "inpaint_mask.nii.gz"))) > 0
        assert not (sitk.GetArrayFromImage(m).astype(bool) & ~inpainted).any()


@pytest.mark.slow
def test_resampling_on_the_device_gives_the_same_study(model, tmp_path, monkeypatch):
    """The GPU path's torch resampling (forced here on the CPU) against SimpleITK, through
    every stage: same maps, same pseudo-healthy study, same refined masks."""
    import torch

    from diffugts.networks.backbones.base import Backbone

    # A study finer than the model grid (2.75 x 2.75 x 4 mm), so every stage resamples.
    spec = CaseSpec(seed=11, index=0, shape=(40, 80, 80), spacing=(2.2, 2.2, 3.2), split="seen", healthy_fraction=0.0)
    case = write_case(generate_case(spec), tmp_path / "case")
    args = [
        "-q",
        "segment",
        str(case / "dicom"),
        "--model",
        str(model.root),
        "--prompt",
        "liver tumor",
        "--no-report",
        "--out",
    ]
    # Threshold 0: the random head's maps cover the study, so synthesis and refinement work
    # (refinement skips targets without a region, and a random head may find none at 0.5).
    monkeypatch.setattr("diffugts.stages.attend.default_threshold", lambda *a, **k: 0.0)
    assert main([*args, str(tmp_path / "host")]) == 0
    import diffugts.stages.preprocess as preprocess

    calls = []
    monkeypatch.setattr(Backbone, "resample_device", property(lambda self: torch.device("cpu")))
    monkeypatch.setattr(
        preprocess, "resample_torch", lambda *a, _real=preprocess.resample_torch, **k: calls.append(1) or _real(*a, **k)
    )
    assert main([*args, str(tmp_path / "device")]) == 0
    assert len(calls) >= 6  # attend, synthesis (study, region, paste-back), refine (x, H, region, maps)

    def read(run, path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / run / path)))

    att = json.loads((tmp_path / "host" / "attention" / "attention.json").read_text())["targets"][0]
    np.testing.assert_allclose(
        read("device", f"attention/{att['map']}"), read("host", f"attention/{att['map']}"), atol=1e-3
    )
    np.testing.assert_allclose(
        read("device", "synthesis/pseudo_healthy.nii.gz"), read("host", "synthesis/pseudo_healthy.nii.gz"), atol=0.5
    )  # HU
    host, dev = (
        read(r, "lesions/" + json.loads((tmp_path / r / "lesions" / "lesions.json").read_text())["targets"][0]["mask"])
        > 0
        for r in ("host", "device")
    )
    assert (host != dev).mean() < 1e-3


def test_resample_device_is_the_optimised_cuda_path_only():
    from types import SimpleNamespace

    import torch

    from diffugts.networks.backbones.base import Backbone

    where = Backbone.resample_device.fget
    assert where(SimpleNamespace(device=torch.device("cuda:0"), optimized=True)) == torch.device("cuda:0")
    assert where(SimpleNamespace(device=torch.device("cuda:0"), optimized=False)) is None  # fp32 baseline
    assert where(SimpleNamespace(device=torch.device("cpu"))) is None


def test_segment_bad_input_is_one_line(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "segment",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(model.root),
            "--prompt",
            "liver tumor",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no files found" in err[0]


def test_refine_needs_its_inputs(model, case, tmp_path, capsys):
    assert main(["-q", "ingest", str(case / "dicom"), "--out", str(tmp_path / "study")]) == 0
    code = main(
        [
            "refine",
            str(tmp_path / "study"),
            "--attention",
            str(tmp_path / "nope"),
            "--synthesis",
            str(tmp_path / "nope"),
            "--model",
            str(model.root),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not an attention artifact" in err[0]


def test_evaluate_runs_every_variant(model, case, tmp_path):
    result = evaluate(case.parent, str(model.root), show_progress=False)
    variants = {r["variant"] for r in result["rows"]}
    assert variants == {"baseline", "aova", "residual", "full", "organ_zscore"}
    organs = {r["organ"] for r in result["rows"]}
    meta = json.loads((case / "case.json").read_text())
    assert organs == {les["organ"].replace("left ", "").replace("right ", "") for les in meta["lesions"]}
    for row in result["rows"]:
        assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["nsd"] <= 1.0
        assert row["split"] == "seen"
        # Removing false lesions never lowers Dice, exact delineation of what was found never does either.
        assert row["dice"] - 1e-4 <= row["dice_without_false"] <= row["dice_found_exact"] + 1e-4 <= 1.0 + 1e-4
    text = markdown(result)
    assert "### By split" in text and "| full |" in text and "Lesion-free" not in text
    assert "### Where Dice goes" in text


@pytest.fixture(scope="module")
def fused_model(tmp_path_factory):
    return random_package(tmp_path_factory.mktemp("fused"), fused=True)


@pytest.mark.slow
def test_segment_with_fused_maps_writes_each_targets_organ_and_refines_with_it(fused_model, case, tmp_path):
    out = tmp_path / "seg"
    assert (
        main(
            [
                "-q",
                "segment",
                str(case / "dicom"),
                "--out",
                str(out),
                "--model",
                str(fused_model.root),
                "--prompt",
                "liver tumor",
                "--no-report",
            ]
        )
        == 0
    )
    att = json.loads((out / "attention" / "attention.json").read_text())
    entry = att["targets"][0]
    organ = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "attention" / entry["organ"]))) > 0
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "attention" / entry["map"])))
    assert organ.shape == prob.shape
    # The fused map is zero outside the organ (up to the linear resampling at its border).
    assert prob[~ndimage.binary_dilation(organ, iterations=2)].max(initial=0) < 1e-6
    lesions = json.loads((out / "lesions" / "lesions.json").read_text())
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesions" / lesions["targets"][0]["mask"]))) > 0
    assert mask.shape == organ.shape


@pytest.mark.slow
def test_evaluate_with_fused_maps_adds_the_organ_zscore_baseline_and_healthy_studies(fused_model, case, tmp_path):
    import shutil

    cases = tmp_path / "cases"
    shutil.copytree(case, cases / case.name)
    spec = CaseSpec(seed=11, index=1, shape=(32, 64, 64), healthy=True)
    write_case(generate_case(spec), cases, dicom=False)
    result = evaluate(cases, str(fused_model.root), show_progress=False)
    assert set(result["variants"]) == {"baseline", "aova", "residual", "full", "organ_zscore"}
    assert {r["variant"] for r in result["rows"]} == set(result["variants"])
    healthy = result["healthy"]["CT"]
    assert set(healthy) == set(result["variants"]) and healthy["full"]["studies"] == 1
    assert {r["organ"] for r in result["healthy_rows"]} == {"kidney", "liver", "pancreas", "spleen"}
    for row in result["rows"] + result["healthy_rows"]:
        assert row["false_lesions"] >= 0
    for row in result["healthy_rows"]:  # a false lesion has a volume, and only a false lesion
        assert (row["false_volume_ml"] > 0) == (row["false_lesions"] > 0)
    text = markdown(result)
    assert "### By modality and split" in text.split("### By split")[0]  # the headline grouping first
    assert "Lesion-free studies" in text and "organ_zscore" in text


def test_false_lesions_counts_components_that_touch_no_true_lesion():
    from diffugts.runners.evaluate import false_components, false_lesions

    g = Geometry((0, 0, 0), (1.0, 1.0, 1.0), np.eye(3), (20, 40, 40))
    truth = np.zeros(g.shape, bool)
    truth[5:10, 5:10, 5:10] = True
    pred = np.zeros(g.shape, bool)
    pred[6:9, 6:12, 6:9] = True  # overlaps the lesion: not false
    pred[12:18, 20:26, 20:26] = True  # 216 mm3: a false lesion
    pred[2, 30, 30] = True  # 1 mm3: below the reported minimum volume, not counted
    assert false_lesions(pred, truth, g) == 1
    assert false_components(pred, truth, g) == (1, pytest.approx(0.216))  # mL: the false one only


def test_lesion_free_summary_reports_false_volume_per_study():
    def row(case, modality, organ, false, ml=None):
        extra = {} if ml is None else {"false_volume_ml": ml}  # None: a row written before it existed
        return {"case": case, "modality": modality, "organ": organ, "variant": "full", "false_lesions": false, **extra}

    rows = [row("a", "CT", "liver", 1, 50.0), row("a", "CT", "kidney", 1, 0.5), row("b", "CT", "liver", 0, 0.0)]
    rows.append(row("c", "MR", "liver", 2))
    summary = summarise_healthy(rows)
    assert summary["CT"]["full"] == {"false_lesions_per_study": 1.0, "false_volume_ml_per_study": 25.25, "studies": 2}
    assert summary["MR"]["full"]["false_volume_ml_per_study"] == 0.0
    text = markdown(
        {
            "model": {"name": "m", "sha256": "0" * 64},
            "cases": 3,
            "prompt_template": "{organ} tumor",
            "variants": ["full"],
            "summary": {},
            "healthy": summary,
            "rows": [],
        }
    )
    assert "| CT | 2 | 1.00 / 25.2 |" in text  # format(25.25, ".1f"): round half to even


def test_metrics_on_known_shapes():
    a = np.zeros((10, 20, 20), bool)
    b = np.zeros_like(a)
    a[2:8, 5:15, 5:15] = True
    b[2:8, 5:15, 7:17] = True  # shifted by 2 voxels
    assert dice(a, a) == 1.0 and dice(a, np.zeros_like(a)) == 0.0
    assert dice(a, b) == pytest.approx(2 * 6 * 10 * 8 / (2 * 600))
    assert nsd(a, a, (1, 1, 1)) == pytest.approx(1.0)
    assert nsd(a, b, (1, 1, 1), tolerance_mm=3.0) == pytest.approx(1.0)  # shift within tolerance
    assert nsd(a, b, (1, 1, 1), tolerance_mm=0.5) < 0.9


def test_intensity_baseline_finds_a_bright_blob_in_soft_tissue():
    vol = np.full((20, 40, 40), -1000, np.float32)
    vol[:, 5:35, 5:35] = 50 + np.random.default_rng(0).normal(0, 5, (20, 30, 30))
    vol[8:12, 18:22, 18:22] = 200
    g = Geometry((0, 0, 0), (1, 1, 1), np.eye(3), vol.shape)
    found = intensity_baseline(vol, g, "CT")
    assert found[10, 20, 20] and found.sum() < 400
    assert body_mask(vol, "CT")[10, 20, 20]


def test_target_region_grows_a_prompts_own_mask_only():
    from diffugts.stages.refine import target_region

    g = Geometry((0, 0, 0), (1.0, 1.0, 2.0), np.eye(3), (20, 40, 40))
    mask = np.zeros(g.shape, bool)
    mask[10, 20, 20] = True
    grown = target_region(mask, g, 4.0)
    assert grown[10, 20, 24] and not grown[10, 20, 25]  # 4 mm in-plane at 1 mm
    assert grown[12, 20, 20] and not grown[13, 20, 20]  # 2 slices of 2 mm
    assert not target_region(np.zeros(g.shape, bool), g, 4.0).any()


def test_refine_probability_batches_targets_without_changing_them():
    """All targets in one pass give each target's map as one at a time (batch norm is fixed)."""
    import torch

    from diffugts.networks.refine import IN_CHANNELS, RefineHead
    from diffugts.stages.refine import refine_probability

    torch.manual_seed(0)
    head = RefineHead(features=(4, 8, 8, 16, 16, 4)).eval()
    rng = np.random.default_rng(0)
    shared = rng.random((IN_CHANNELS - 1, 16, 32, 32), dtype=np.float32)
    coarse = rng.random((3, 16, 32, 32), dtype=np.float32)
    batched = refine_probability(head, shared, coarse, roi=(16, 16, 16))
    assert batched.shape == coarse.shape
    for n in range(3):
        one = refine_probability(head, shared, coarse[n], roi=(16, 16, 16))
        assert one.shape == coarse[n].shape
        np.testing.assert_allclose(batched[n], one, atol=1e-5)
    assert not np.allclose(batched[0], batched[1], atol=1e-3)  # each target's own map
    # Heads with several channels per target (coarse map, deviation, organ): (T, C, *S).
    head3 = RefineHead(in_channels=IN_CHANNELS + 2, features=(4, 8, 8, 16, 16, 4)).eval()
    own = rng.random((3, 3, 16, 32, 32), dtype=np.float32)
    batched = refine_probability(head3, shared, own, roi=(16, 16, 16))
    assert batched.shape == coarse.shape
    np.testing.assert_allclose(batched[1], refine_probability(head3, shared, own[1:2], roi=(16, 16, 16))[0], atol=1e-5)


def test_shared_inputs_are_the_residual_channels_of_the_method():
    """x, H, the pixel residual (signed, absolute), one feature residual per encoder level
    (channel mean of |E(x) - E(H)| over the std of E(x), upsampled), the inpainted region."""
    import torch
    import torch.nn.functional as F

    from diffugts.models import get_config
    from diffugts.networks.backbones import build_backbone
    from diffugts.stages.refine import RESIDUAL_GAIN, shared_inputs

    torch.manual_seed(0)
    backbone = build_backbone(get_config("demo"))
    rng = np.random.default_rng(0)
    x = rng.random((32, 48, 64), dtype=np.float32)
    h = x.copy()
    h[8:20, 10:30, 20:40] *= 0.7
    region = np.zeros(x.shape, bool)
    region[6:22, 8:32, 18:42] = True
    got = shared_inputs(backbone, x, h, region)
    assert got.shape == (8, *x.shape) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], x)
    np.testing.assert_array_equal(got[1], h)
    np.testing.assert_allclose(got[2], (x - h) * RESIDUAL_GAIN, atol=1e-6)
    np.testing.assert_allclose(got[3], np.abs(x - h) * RESIDUAL_GAIN, atol=1e-6)
    with torch.no_grad():
        ex = backbone.encoder_features(torch.from_numpy(x)[None, None])
        eh = backbone.encoder_features(torch.from_numpy(h)[None, None])
    for n, (fx, fh) in enumerate(zip(ex, eh)):
        r = (fx - fh).abs().mean(1, keepdim=True) / (fx.std() + 1e-6)
        want = F.interpolate(r, size=x.shape, mode="trilinear", align_corners=False)[0, 0].numpy()
        np.testing.assert_array_equal(got[4 + n], want)
    assert got[4:7, region].mean() > 2 * got[4:7, ~region].mean() + 1e-6  # the change shows where H changed
    np.testing.assert_array_equal(got[7], region.astype(np.float32))


def test_refine_probability_bounds_the_voxels_of_a_pass_without_changing_the_maps(monkeypatch):
    """A study with many findings runs its targets in several bounded passes, same maps."""
    import torch

    import diffugts.stages.refine as refine_module
    from diffugts.networks.refine import IN_CHANNELS, RefineHead
    from diffugts.stages.refine import refine_probability

    torch.manual_seed(0)
    head = RefineHead(features=(4, 8, 8, 16, 16, 4)).eval()
    rng = np.random.default_rng(1)
    shared = rng.random((IN_CHANNELS - 1, 16, 16, 32), dtype=np.float32)
    coarse = rng.random((5, 16, 16, 32), dtype=np.float32)
    at_once = refine_probability(head, shared, coarse)
    seen = []
    head.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))
    monkeypatch.setattr(refine_module, "HEAD_BATCH_VOXELS", 2 * 16 * 16 * 32)  # two whole-grid windows
    bounded = refine_probability(head, shared, coarse)
    assert seen == [2, 2, 1]
    np.testing.assert_allclose(bounded, at_once, atol=1e-5)
    seen.clear()
    windows = refine_probability(head, shared, coarse, roi=(16, 16, 16))  # half-size windows: four per call
    assert seen[0] == 4 and max(seen) <= 4 and sum(seen) % 5 == 0 and len(seen) > 2
    assert windows.shape == coarse.shape


def _artifacts(model, case, out):
    """attend + synthesize artifacts of the case (random model), for refine() to read."""
    args = ["-q", "segment", str(case / "dicom"), "--model", str(model.root), "--no-report", "--out", str(out)]
    for prompt in ("liver tumor", "kidney cyst", "spleen lesion"):
        args += ["--prompt", prompt]
    assert main(args) == 0
    return json.loads((out / "attention" / "attention.json").read_text())["targets"]


def _rewrite(path, array):
    ref = sitk.ReadImage(str(path))
    image = sitk.GetImageFromArray(array.astype(sitk.GetArrayViewFromImage(ref).dtype))
    image.CopyInformation(ref)
    sitk.WriteImage(image, str(path))


def test_refine_skips_targets_without_a_region_and_batches_the_rest(model, case, tmp_path, monkeypatch):
    import shutil

    import diffugts.stages.refine as refine_module

    out = tmp_path / "seg"
    targets = _artifacts(model, case, out)
    att, syn = out / "attention", out / "synthesis"
    shape = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "study" / "volume.nii"))).shape
    # Target 0 and 2 point at two boxes inside the body, target 1 at nothing; synthesis
    # "inpainted" both boxes (the refined masks must stay inside them).
    k, j, i = (s // 2 for s in shape)
    boxes = [np.zeros(shape, bool) for _ in range(3)]
    boxes[0][k - 3 : k + 3, j - 6 : j, i - 6 : i] = True
    boxes[2][k - 3 : k + 3, j : j + 6, i : i + 6] = True
    for n, t in enumerate(targets):
        _rewrite(att / t["map"], boxes[n].astype(np.float32) * 0.9)
    grown = [ndimage.binary_dilation(b, iterations=2) for b in boxes]
    _rewrite(syn / "inpaint_mask.nii.gz", np.logical_or.reduce(grown).astype(np.uint8))
    calls = []
    real = refine_module.refine_probability
    monkeypatch.setattr(
        refine_module,
        "refine_probability",
        lambda head, shared, coarse, roi=None: calls.append(np.shape(coarse)) or real(head, shared, coarse, roi),
    )
    summary = refine_module.refine(out / "study", att, syn, str(model.root), tmp_path / "three")
    assert [c[0] for c in calls] == [2]  # targets 0 and 2 in one pass, target 1 not at all
    assert summary["targets"][1]["lesion_ids"] == []

    def mask(run, n):
        entry = json.loads((tmp_path / run / "lesions.json").read_text())["targets"][n]
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / run / entry["mask"]))) > 0

    assert not mask("three", 1).any()
    # Target 0 alone (an attention artifact with only its entry) gives the same mask.
    alone = tmp_path / "att-alone"
    shutil.copytree(att, alone)
    meta = json.loads((att / "attention.json").read_text())
    meta["targets"] = meta["targets"][:1]
    (alone / "attention.json").write_text(json.dumps(meta))
    refine_module.refine(out / "study", alone, syn, str(model.root), tmp_path / "one")
    assert (mask("one", 0) == mask("three", 0)).all()


def test_refine_of_a_study_with_no_region_loads_no_networks(model, case, tmp_path, monkeypatch):
    import diffugts.stages.refine as refine_module

    out = tmp_path / "seg"
    targets = _artifacts(model, case, out)
    for t in targets:
        path = out / "attention" / t["map"]
        _rewrite(path, np.zeros_like(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))

    def boom(*a, **k):
        raise AssertionError("no feature pass expected")

    monkeypatch.setattr(refine_module, "shared_inputs", boom)
    monkeypatch.setattr("diffugts.networks.backbones.load_backbone", boom)
    summary = refine_module.refine(
        out / "study", out / "attention", out / "synthesis", str(model.root), tmp_path / "lesions"
    )
    assert [t["lesion_ids"] for t in summary["targets"]] == [[], [], []]
    assert (tmp_path / "lesions" / "lesions.json").is_file()


def summary_row(modality: str, dice: float, **counts) -> dict:
    """One evaluation row of the full method on two unseen-type liver lesions."""
    return {
        "modality": modality,
        "split": "unseen",
        "lesion_type": "t",
        "organ": "liver",
        "variant": "full",
        "dice": dice,
        "nsd": dice,
        "lesions": 2,
        **counts,
    }


def result_of(summary: dict) -> dict:
    """An evaluation result around ``summary``, as markdown() reads it."""
    return {
        "model": {"name": "m", "sha256": "0" * 64},
        "prompt_template": "{organ} tumor",
        "cases": 2,
        "variants": ["full"],
        "summary": summary,
        "healthy": {},
    }


def test_detection_by_touch_and_by_overlap():
    """A lesion the prediction only grazes is detected by touch, not at the minimum overlap;
    the summary and the report carry both rates, and results written before the overlap keep
    their tables."""
    from diffugts.runners.evaluate import DETECTION_MIN_OVERLAP, detection, markdown, summarise

    lesions = np.zeros((4, 20, 20), np.uint16)
    lesions[1:3, 2:7, 2:7] = 1  # 50 voxels
    lesions[1:3, 10:15, 10:15] = 2  # 50 voxels
    pred = np.zeros(lesions.shape, bool)
    pred[1:3, 2:7, 2:7] = True  # lesion 1 covered
    pred[1, 10, 10:14] = True  # lesion 2 grazed: 4 of 50 voxels
    assert detection(pred, lesions, [1, 2]) == (2, 2)
    assert detection(pred, lesions, [1, 2], DETECTION_MIN_OVERLAP) == (1, 2)
    pred[1:3, 10, 10:13] = True  # 6 voxels: 12 % of lesion 2
    assert detection(pred, lesions, [1, 2], DETECTION_MIN_OVERLAP) == (2, 2)
    assert detection(np.zeros_like(pred), lesions, [1, 2], 0.0) == (0, 2)

    def row(detected, overlap):
        r = summary_row("CT", 0.5, detected=detected, false_lesions=0)
        return r if overlap is None else {**r, "detected_overlap": overlap}

    summary = summarise([row(2, 1), row(1, 0)])
    cell = summary["modality_split"]["CT / unseen"]["full"]
    assert cell["detection"] == 0.75 and cell["detection_overlap"] == 0.25
    result = result_of(summary)
    assert "| CT / unseen | 0.75 / 0.25 |" in markdown(result)
    old = summarise([row(2, None)])
    assert "detection_overlap" not in old["modality_split"]["CT / unseen"]["full"]
    assert "at least 10%" not in markdown({**result, "summary": old})


def test_dice_budget_splits_the_loss_into_false_lesions_delineation_and_missed_lesions():
    """Without false lesions: the components touching no true lesion go; found exactly: the
    touched lesions' own voxels; summary and report carry both, old results keep their tables."""
    from diffugts.runners.evaluate import dice, dice_budget, lesion_overlap, markdown, summarise

    lesions = np.zeros((4, 30, 30), np.uint16)
    lesions[1:3, 2:7, 2:7] = 1  # 50 voxels, found and over-grown
    lesions[1:3, 20:25, 20:25] = 2  # 50 voxels, missed
    truth = lesions > 0
    pred = np.zeros(truth.shape, bool)
    pred[1:3, 2:12, 2:7] = True  # lesion 1 and 50 voxels beside it: one component
    pred[1:3, 14:19, 2:7] = True  # a false lesion, 50 voxels
    covered, size = lesion_overlap(pred, lesions, [1, 2])
    without_false, found_exact = dice_budget(pred, truth, covered, size)
    assert dice(pred, truth) == pytest.approx(2 * 50 / (150 + 100))
    assert without_false == pytest.approx(2 * 50 / (100 + 100))
    assert found_exact == pytest.approx(2 * 50 / (50 + 100))
    assert dice_budget(np.zeros_like(pred), truth, *lesion_overlap(np.zeros_like(pred), lesions, [1, 2])) == (0.0, 0.0)
    exact = lesions == 1
    assert dice_budget(exact, truth, *lesion_overlap(exact, lesions, [1, 2])) == (
        pytest.approx(2 / 3),
        pytest.approx(2 / 3),
    )

    def row(d, budget):
        r = summary_row("MR", d, detected=1, detected_overlap=1, false_lesions=1)
        return r if budget is None else {**r, "dice_without_false": budget[0], "dice_found_exact": budget[1]}

    summary = summarise([row(0.4, (0.5, 0.6)), row(0.2, (0.3, 1.0))])
    cell = summary["modality_split"]["MR / unseen"]["full"]
    assert (cell["dice"], cell["dice_without_false"], cell["dice_found_exact"]) == (0.3, 0.4, 0.8)
    result = result_of(summary)
    assert "| MR / unseen | 0.300 / 0.400 / 0.800 |" in markdown(result)
    mixed = summarise([row(0.4, (0.5, 0.6)), row(0.2, None)])  # a row of a result written before it
    assert "dice_found_exact" not in mixed["modality_split"]["MR / unseen"]["full"]
    assert "Where Dice goes" not in markdown({**result, "summary": mixed})
