"""The 2D (diffusers) family's demo recipe and its training-free maps, on small phantoms
(16 x 48 x 48): backbone training (losses, scale factor, frozen networks, captions),
`diffugts train demo --config demo-2d --quick` writing a verifiable package, `attend --maps
training-free` (an artifact synthesis accepts; a clear error for a 3D package), and the
training_free variant of `diffugts evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffugts.cli import main
from diffugts.models import get_config, open_package
from diffugts.models.create import create_random
from diffugts.networks.backbones import build_backbone, load_backbone
from diffugts.stages.preprocess import Preprocessing
from diffugts.train.data import TrainingCase, phantom_case

# One thread, as test_backbone_2d: two-thread runs spin and crawl when another process holds
# a core of the 2-core machine (measured 5 min instead of 30 s).
torch.set_num_threads(1)

SMALL = (16, 48, 48)  # phantom (z, y, x): the middle of the abdomen, 16 slices of 48 x 48


def _mean(values) -> float:
    return float(np.mean(values))


@pytest.fixture(scope="module")
def prep() -> Preprocessing:
    return Preprocessing.from_dict(get_config("demo-2d")["preprocessing"])


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    """The quick 2D demo recipe through the CLI (backbone -> AOVA head -> refinement head)."""
    out = tmp_path_factory.mktemp("demo2d") / "pkg"
    assert main(["-q", "train", "demo", "--config", "demo-2d", "--quick", "--out", str(out)]) == 0
    return open_package(out)


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    from diffugts.phantom import CaseSpec, generate_case, write_case

    spec = CaseSpec(seed=11, index=0, shape=SMALL, split="seen", healthy_fraction=0.0)
    return write_case(generate_case(spec), tmp_path_factory.mktemp("case") / "c0")


@pytest.fixture(scope="module")
def study(case_dir, tmp_path_factory):
    from diffugts.stages.ingest import ingest

    out = tmp_path_factory.mktemp("study") / "study"
    ingest(case_dir / "dicom", out, show_progress=False)
    return out


# --- backbone training ------------------------------------------------------------------------


def test_captions_name_the_organs_of_a_slice():
    from diffugts.train.backbone2d import caption

    names = {1: "body", 4: "liver", 5: "spleen", 6: "right kidney"}
    organs = np.ones((48, 48), np.uint8)
    organs[:20, :20] = 4
    organs[30:, 30:] = 6
    organs[0, 47] = 5  # one pixel: below ORGAN_MIN_FRACTION, not named
    assert caption(organs, names) == "CT slice with liver, right kidney"  # label order, no "body"
    assert caption(np.ones((8, 8), np.uint8), names) == "CT slice"


def test_healthy_slices_keep_clear_of_lesions():
    from diffugts.train.backbone2d import healthy_slices

    lesions = np.zeros((16, 4, 4), np.uint16)
    lesions[7, 1, 1] = 3
    case = TrainingCase("c", "CT", np.zeros((16, 4, 4), np.float32), np.zeros((16, 4, 4), np.uint8), lesions, [], {})
    assert healthy_slices(case, margin=2).tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15]


@pytest.mark.slow
def test_2d_backbone_training_losses_fall_and_set_the_scale_factor(prep):
    """VAE (L1 + KL on slice crops) and captioned DDPM denoiser on a healthy and a lesion
    phantom: both losses fall well below their start, the scale factor is 1 / std of the
    healthy latents (written where the 2D backbone reads it), and everything is frozen."""
    from diffugts.train.backbone2d import fit_backbone_2d, slice_latents, slice_set

    torch.manual_seed(0)
    backbone = build_backbone({**get_config("demo-2d"), "scale_factor": 1.0})
    cases = [phantom_case(1000, i, prep, split="seen", healthy=(i % 2 == 0), shape=SMALL) for i in range(2)]
    fitted = fit_backbone_2d(backbone, cases, vae_steps=30, denoiser_steps=30, seed=0, show_progress=False)
    assert len(fitted.vae_curve) == len(fitted.unet_curve) == 30
    assert _mean(fitted.vae_curve[-5:]) < 0.7 * _mean(fitted.vae_curve[:5])  # measured 0.55
    denoise = fitted.curves["denoising"]
    assert _mean(denoise[-5:]) < 0.75 * _mean(denoise[:5])  # measured 0.59
    assert _mean(fitted.unet_curve[-5:]) < 0.85 * _mean(fitted.unet_curve[:5])  # with grounding: measured 0.73
    healthy = slice_set(backbone, cases, healthy_only=True)
    # The lesion case contributes only its lesion-free slices.
    assert 16 < len(healthy.index) < 32 and fitted.details["denoiser_slices"] == len(healthy.index)
    std = float(slice_latents(backbone, healthy).std())
    assert backbone.scale_factor == pytest.approx(1 / std, rel=1e-4) and abs(backbone.scale_factor - 1) > 0.05
    assert backbone.vae.config.scaling_factor == backbone.config["vae"]["scaling_factor"] == backbone.scale_factor
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.vae.training and not backbone.unet.training


def test_word_tokens_find_organ_names_in_a_caption():
    from diffugts.train.backbone2d import WordTokens

    backbone = build_backbone(get_config("demo-2d"))
    text = "CT slice with liver, right kidney, left kidney"
    # [CLS] ct slice with liver , right kidney , left kidney [SEP]
    assert WordTokens(backbone)(text, ["liver", "right kidney", "left kidney"]) == [[4], [6, 7], [9, 10]]
    assert backbone.tokens(text).tokens[9:11] == ["left", "kidney"]  # the backbone's own tokenisation
    with pytest.raises(ValueError, match="not found"):
        WordTokens(backbone)(text, ["spleen"])


@pytest.mark.slow
def test_token_grounding_makes_organ_words_attend_to_their_organs(prep):
    """The same short denoiser training with and without the grounding term: only with it
    does the cross-attention of "liver" / "spine" land on the liver / spine (measured
    contrast inside - outside: 0.36 / 0.21 with, 0.00 / 0.00 without)."""
    from diffugts.networks.backbones.cross_attention import cross_attention_maps
    from diffugts.train.backbone2d import set_scale_factor, slice_latents, slice_set, train_unet_2d

    cases = [phantom_case(1000, i, prep, split="seen", healthy=True, shape=SMALL) for i in range(2)]
    x = torch.from_numpy(cases[0].x)[None, None]
    label = {name: lab for lab, name in cases[0].organ_names.items()}
    contrast = {}
    for weight in (1.0, 0.0):
        torch.manual_seed(0)
        backbone = build_backbone({**get_config("demo-2d"), "scale_factor": 1.0})
        healthy = slice_set(backbone, cases, healthy_only=True)
        z = slice_latents(backbone, healthy)
        set_scale_factor(backbone, 1 / float(z.std()))
        curves = train_unet_2d(
            backbone,
            z * backbone.scale_factor,
            healthy,
            40,
            0,
            batch=8,
            lr=5e-3,
            grounding=weight,
            unconditional=0.0,
            show_progress=False,
        )
        maps = cross_attention_maps(backbone, x, ["liver", "spine"]).maps[0].numpy()
        organs = cases[0].organs
        contrast[weight] = [
            float(m[organs == label[o]].mean() - m[organs != label[o]].mean()) for m, o in zip(maps, ["liver", "spine"])
        ]
        if weight:
            assert _mean(curves["grounding"][-8:]) < 0.9 * _mean(curves["grounding"][:8])  # measured 0.70
        else:
            assert not any(curves["grounding"])
    assert min(contrast[1.0]) > 0.1 and max(abs(c) for c in contrast[0.0]) < 0.05, contrast


@pytest.mark.slow
def test_quick_2d_demo_writes_a_verifiable_package(quick_model, capsys):
    assert main(["models", "verify", str(quick_model.root)]) == 0
    assert "OK" in capsys.readouterr().out
    m = quick_model.manifest
    assert m["family"] == "diffusers2d" and set(m["networks"]) == {"vae", "unet", "aova", "refine"}
    prov = m["provenance"]
    assert prov["recipe"]["config"] == "demo-2d" and prov["recipe"]["phantom_shape"] == list(SMALL)
    for part in ("aova_training", "refine_training"):  # each part's own record, with its command
        assert prov[part]["command"] and prov[part]["cases"] == prov["recipe"][part.replace("_training", "_cases")]
    assert prov["backbone_training"]["cases"] == prov["recipe"]["backbone_cases"]
    assert "healthy CT slices only" in prov["backbone_training"]["denoiser_data"]
    # The AOVA head reads the 2D backbone's own scales, its cross-attention maps among them.
    assert "cross_attention" in m["networks"]["aova"]["features"]
    # The trained latent scale travels in the VAE config, where the backbone reads it.
    scale = m["backbone"]["vae"]["scaling_factor"]
    assert scale == m["backbone"]["scale_factor"] != 1.0
    assert load_backbone(quick_model).scale_factor == scale


# --- training-free maps -----------------------------------------------------------------------


@pytest.mark.slow
def test_attend_training_free_feeds_synthesis(quick_model, study, tmp_path):
    from diffugts.artifacts.study import load_study
    from diffugts.config import SynthesisParams
    from diffugts.networks.aova import top_mean
    from diffugts.networks.backbones.cross_attention import training_free_probability
    from diffugts.networks.text import make_target
    from diffugts.stages.attend import TRAINING_FREE_TOP_FRACTION, attend
    from diffugts.stages.preprocess import to_model
    from diffugts.stages.synthesize import synthesize

    out = tmp_path / "free"
    assert (
        main(
            [
                "-q",
                "attend",
                str(study),
                "--model",
                str(quick_model.root),
                "--prompt",
                "liver tumor",
                "--maps",
                "training-free",
                "--threshold",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "attention.json").read_text())
    assert summary["maps"] == "training-free"
    entry = summary["targets"][0]
    ref = sitk.ReadImage(str(study / "volume.nii"))
    prob = sitk.ReadImage(str(out / entry["map"]))
    assert prob.GetSize() == ref.GetSize()
    p = sitk.GetArrayFromImage(prob)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / entry["mask"]))), p >= 0.5)
    # The map is the backbone's training-free probability (the phantom grid is the model grid).
    s = load_study(study)
    backbone = load_backbone(quick_model)
    prep = Preprocessing.from_dict(quick_model.manifest["preprocessing"])
    x, space = to_model(s.volume, s.geometry, s.modality, prep)
    direct = training_free_probability(backbone, torch.from_numpy(x)[None, None], make_target("liver tumor"))[0]
    np.testing.assert_allclose(p, np.clip(space.to_study(direct.numpy()), 0, 1), atol=1e-4)
    top = float(top_mean(direct[None, None], TRAINING_FREE_TOP_FRACTION))  # the image-level score
    assert 0 <= entry["score"] <= 1 and entry["score"] == pytest.approx(top, abs=1e-3)
    # ... and not the trained head's map.
    aova = attend(study, str(quick_model.root), ["liver tumor"], tmp_path / "aova")
    assert aova["maps"] == "aova"
    p_aova = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "aova" / aova["targets"][0]["map"])))
    assert np.abs(p_aova - p).max() > 1e-3
    # Synthesis takes the artifact as it takes the head's.
    syn = synthesize(
        study,
        str(quick_model.root),
        tmp_path / "syn",
        attention=out,
        params=SynthesisParams(steps=2),
        show_progress=False,
    )
    assert syn["mask"]["source"] == "attention" and syn["mask"]["coarse_voxels"] == int((p >= 0.5).sum())


@pytest.mark.slow
def test_segment_with_training_free_maps_end_to_end(quick_model, case_dir, tmp_path):
    out = tmp_path / "seg"
    assert (
        main(
            [
                "-q",
                "segment",
                str(case_dir / "dicom"),
                "--model",
                str(quick_model.root),
                "--prompt",
                "liver tumor",
                "--maps",
                "training-free",
                "--no-report",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "attention" / "attention.json").read_text())["maps"] == "training-free"
    lesions = json.loads((out / "lesions" / "lesions.json").read_text())
    assert lesions["targets"][0]["prompt"]["text"] == "liver tumor"


def test_training_free_needs_no_head(study, tmp_path):
    from diffugts.stages.attend import attend

    bare = create_random(tmp_path / "bare2d", "demo-2d", seed=1)  # backbone only
    summary = attend(study, str(bare.root), ["kidney cyst"], tmp_path / "o", maps="training-free")
    assert summary["maps"] == "training-free" and summary["targets"][0]["prompt"]["organ"] == "kidney"
    assert (tmp_path / "o" / summary["targets"][0]["mask"]).is_file()


def test_training_free_on_a_3d_package_is_a_clear_error(study, tmp_path, capsys):
    bare = create_random(tmp_path / "bare3d", "demo", seed=0)
    code = main(
        [
            "attend",
            str(study),
            "--model",
            str(bare.root),
            "--prompt",
            "liver tumor",
            "--maps",
            "training-free",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cross-attention" in err[0] and "'maisi'" in err[0]
    assert not (tmp_path / "o").exists()


def test_segment_refuses_training_free_on_a_3d_package_before_any_output(case_dir, tmp_path, capsys):
    bare = create_random(tmp_path / "bare3d", "demo", seed=0)
    code = main(
        [
            "segment",
            str(case_dir / "dicom"),
            "--model",
            str(bare.root),
            "--prompt",
            "liver tumor",
            "--maps",
            "training-free",
            "--out",
            str(tmp_path / "seg"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cross-attention" in err[0]
    assert not (tmp_path / "seg").exists()


def test_segment_api_rejects_unknown_maps_before_ingest(case_dir, tmp_path):
    from diffugts.errors import ConfigError
    from diffugts.runners.segment import segment

    with pytest.raises(ConfigError, match="unknown maps 'attention'"):
        segment(
            str(case_dir / "dicom"),
            tmp_path / "seg",
            ["liver tumor"],
            model="demo",
            maps="attention",
            show_progress=False,
        )
    assert not (tmp_path / "seg").exists()


# --- evaluation -------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_adds_the_training_free_variant(quick_model, case_dir):
    from diffugts.runners.evaluate import VARIANTS, evaluate, markdown

    result = evaluate(case_dir.parent, str(quick_model.root), show_progress=False)
    assert result["variants"] == [*VARIANTS, "organ_zscore", "training_free"]
    assert {r["variant"] for r in result["rows"]} == set(result["variants"])
    free = [r for r in result["rows"] if r["variant"] == "training_free"]
    assert free and all(0 <= r["dice"] <= 1 for r in free)
    # Its rows carry the training-free map's own image-level score, not the AOVA head's.
    aova = {(r["case"], r["organ"]): r["score"] for r in result["rows"] if r["variant"] == "aova"}
    assert any(abs(r["score"] - aova[(r["case"], r["organ"])]) > 1e-6 for r in free)
    text = markdown(result)
    header = next(line for line in text.splitlines() if line.startswith("| group"))
    assert [c.strip() for c in header.strip("|").split("|")][2:] == result["variants"]


def test_markdown_handles_variant_sets_that_differ():
    from diffugts.runners.evaluate import markdown

    cell = {"dice": 0.5, "nsd": 0.5, "detection": 1.0, "n": 1}
    result = {
        "model": {"name": "m", "sha256": "0" * 64},
        "cases": 2,
        "prompt_template": "{organ} tumor",
        "summary": {"split": {"seen": {"aova": cell, "training_free": cell}, "unseen": {"full": cell}}},
    }
    text = markdown(result)  # no "variants" list (an older result): taken from the cells
    header = next(line for line in text.splitlines() if line.startswith("| group"))
    assert header.index("aova") < header.index("full") < header.index("training_free")
    seen = next(line for line in text.splitlines() if line.startswith("| seen"))
    unseen = next(line for line in text.splitlines() if line.startswith("| unseen"))
    assert seen.count("-") == 1 and unseen.count(" - ") == 2
