"""Pseudo-healthy synthesis: paste-back exactness, determinism, tiling, masks, fidelity, CLI.

The demo package has random weights (its denoiser's last layer is zero-initialised, as in
MONAI), so these tests check the machinery, not the quality of the pictures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from diffugts.artifacts.files import write_image
from diffugts.artifacts.geometry import Geometry
from diffugts.cli import main
from diffugts.config import SynthesisParams
from diffugts.errors import InputError
from diffugts.models import open_package
from diffugts.models.create import create_random
from diffugts.networks.backbones import Backbone, load_backbone
from diffugts.stages.synthesize import GroundTruth, Tiles, fidelity, inpaint, make_region, synthesize
from diffugts.stages.synthesize.inpaint import renoise
from diffugts.utils import atomic

DEMO_SPACING = (2.75, 2.75, 4.0)
FAST = SynthesisParams(steps=3, context_mm=16.0)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return create_random(tmp_path_factory.mktemp("model") / "demo", "demo", seed=0)


@pytest.fixture(scope="module")
def backbone(package):
    return load_backbone(open_package(package.root), "cpu")


def make_study(root, shape=(32, 64, 64), spacing=DEMO_SPACING, lesion_hu=-20.0):
    """A CT study: air, a 'body' of 40 HU with texture, a spherical lesion; returns (dir, lesion)."""
    rng = np.random.default_rng(0)
    k, j, i = np.indices(shape)
    zc, yc, xc = (np.asarray(shape) - 1) / 2
    mm = [(k - zc) * spacing[2], (j - yc) * spacing[1], (i - xc) * spacing[0]]
    body = (mm[1] / (shape[1] * spacing[1] * 0.45)) ** 2 + (mm[2] / (shape[2] * spacing[0] * 0.45)) ** 2 < 1
    lesion = (mm[0] ** 2 + mm[1] ** 2 + mm[2] ** 2) < 9.0**2
    volume = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
    volume[lesion] = lesion_hu
    geometry = Geometry((-80.0, -90.0, -300.0), spacing, np.eye(3), shape)
    with atomic.staging_dir(root, marker="series.json") as stage:
        write_image(stage / "volume.nii", volume.astype(np.float32), geometry, compress=False)
        atomic.write_json(
            stage / "series.json", {"modality": "CT", "volume": {"file": "volume.nii", **geometry.as_dict()}}
        )
    return root, lesion, geometry, volume.astype(np.float32)


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_outside_the_dilated_mask_the_output_is_the_input(tmp_path, package, backbone):
    # A study grid unlike the model grid (resampled both ways), lesion off-centre.
    study, lesion, geometry, volume = make_study(tmp_path / "study", shape=(30, 50, 54), spacing=(2.0, 2.2, 3.0))
    write_image(tmp_path / "mask.nii.gz", lesion.astype(np.uint8), geometry)
    summary = synthesize(
        study,
        str(package.root),
        tmp_path / "out",
        mask=tmp_path / "mask.nii.gz",
        params=FAST,
        backbone=backbone,
        show_progress=False,
    )
    out = read(tmp_path / "out" / "pseudo_healthy.nii.gz")
    dilated = read(tmp_path / "out" / "inpaint_mask.nii.gz").astype(bool)
    difference = read(tmp_path / "out" / "difference.nii.gz")
    assert out.dtype == np.float32 and out.shape == volume.shape
    assert np.array_equal(out[~dilated], volume[~dilated])  # bit for bit
    assert not np.any(difference[~dilated])
    np.testing.assert_allclose(difference, volume - out, atol=1e-4)
    assert np.all(out[lesion] != volume[lesion])  # the coarse mask is regenerated
    # The dilation is 8 mm, Euclidean, with the study's anisotropic spacing.
    assert dilated[lesion].all() and summary["mask"]["dilated_voxels"] == dilated.sum() > 2 * lesion.sum()
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~lesion, sampling=(3.0, 2.2, 2.0))
    assert np.array_equal(dilated, dist <= 8.0)
    saved = json.loads((tmp_path / "out" / "synthesis.json").read_text())
    assert saved["parameters"]["steps"] == 3 and saved["parameters"]["dilation_mm"] == 8.0
    assert saved["model"]["name"] == "demo-random-0" and saved["model"]["scheduler"] == "RFlowScheduler"
    assert saved["nothing_to_inpaint"] is False and len(saved["inpainting"]["timesteps"]) == 3
    assert {"encode", "denoise", "decode"} <= set(saved["timings_s"])


def test_paste_back_weights_feather_inside_the_dilated_mask():
    mask = np.zeros((20, 20, 20), bool)
    mask[8:12, 8:12, 8:12] = True
    region = make_region(mask, (1.0, 1.0, 1.0), dilation_mm=5.0, feather_mm=3.0)
    assert np.all(region.weight[mask] == 1) and np.all(region.weight[~region.dilated] == 0)
    ring = region.dilated & ~mask
    assert 0 < region.weight[ring].min() < 1  # a ramp, not a hard edge
    hard = make_region(mask, (1.0, 1.0, 1.0), dilation_mm=5.0, feather_mm=0.0)
    assert np.array_equal(hard.weight > 0, hard.dilated) and set(np.unique(hard.weight)) == {0.0, 1.0}


def test_same_seed_same_output_other_seed_differs_inside_only(tmp_path, package, backbone):
    study, lesion, geometry, volume = make_study(tmp_path / "study")
    write_image(tmp_path / "mask.nii.gz", lesion.astype(np.uint8), geometry)
    outs = []
    for n, seed in enumerate((5, 5, 6)):
        params = SynthesisParams(steps=1, jumps=1, seed=seed, context_mm=16.0)
        synthesize(
            study,
            str(package.root),
            tmp_path / f"out{n}",
            mask=tmp_path / "mask.nii.gz",
            params=params,
            backbone=backbone,
            show_progress=False,
        )
        outs.append(read(tmp_path / f"out{n}" / "pseudo_healthy.nii.gz"))
    dilated = read(tmp_path / "out0" / "inpaint_mask.nii.gz").astype(bool)
    assert np.array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0][lesion], outs[2][lesion])
    assert np.array_equal(outs[0][~dilated], outs[2][~dilated])


class LocalBackbone(Backbone):
    """A stand-in with strictly local networks (block means, a 3x3x3 conv, nearest upsampling):
    a trained model is close to local, a random MAISI is not (GroupNorm over the whole input,
    wide receptive fields), so this is where tiling error can be measured."""

    family = "test"
    latent_stride = 4

    def __init__(self, sampler_from):
        super().__init__()
        self.kernel = torch.randn(4, 4, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.05
        self._sampler_from = sampler_from

    def encode(self, x):
        return F.avg_pool3d(x, 4).repeat(1, 4, 1, 1, 1) * 2 - 1

    def decode(self, z):
        return F.interpolate((z.mean(1, keepdim=True) + 1) / 2, scale_factor=4, mode="nearest")

    def denoise(self, z_t, t, spacing):
        return F.conv3d(z_t, self.kernel, padding=1) * (1 + t / 1000)

    def sampler(self, latent_shape):
        return self._sampler_from.sampler(latent_shape)

    feature_specs = features = encoder_features = None  # not used by synthesis


def test_tiled_and_untiled_agree(backbone):
    local = LocalBackbone(backbone)
    rng = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 32, 96, 96, generator=rng)
    mask = torch.zeros(1, 1, 8, 24, 24, dtype=torch.bool)
    mask[..., 2:6, 6:18, 7:17] = True
    args = dict(strength=0.8, steps=4, jumps=1, seed=0, show_progress=False)
    whole, stats = inpaint(local, x, mask, DEMO_SPACING, **args), {}
    tiled = inpaint(local, x, mask, DEMO_SPACING, tile=(8, 8, 8), overlap=0.5, stats=stats, **args)
    assert stats["tiles"] == 25  # 1 x 5 x 5 windows
    change = (whole - x).abs().mean()
    assert (tiled - whole).abs().mean() < 0.002 * change  # measured: 0.0002
    assert (tiled - whole).abs().max() < 0.05 * change  # measured: 0.011; without overlap: 0.95
    # The real (random) demo backbone runs tiled too: shapes and alignment line up.
    out = inpaint(
        backbone,
        x[..., :32, :32],
        mask[..., :8, :8],
        DEMO_SPACING,
        tile=(8, 4, 8),
        stats=stats,
        **{**args, "steps": 2, "jumps": 0},
    )
    assert out.shape == (1, 1, 32, 32, 32) and torch.isfinite(out).all() and stats["tiles"] == 3


def test_tiles_blend_local_functions_exactly():
    z = torch.randn(1, 4, 8, 20, 12)
    tiles = Tiles.plan(z.shape[2:], (4, 8, 8), 0.5)
    assert tiles.tiled and all(s.stop <= n for w in tiles.windows for s, n in zip(w, z.shape[2:]))
    torch.testing.assert_close(tiles.apply(lambda t: 3 * t + 1, z), 3 * z + 1)
    image = torch.randn(1, 1, 32, 80, 48)
    torch.testing.assert_close(tiles.apply(lambda t: F.avg_pool3d(t, 4), image, scale_in=4), F.avg_pool3d(image, 4))
    up = tiles.apply(lambda t: F.interpolate(t, scale_factor=4), z, scale_out=4)
    torch.testing.assert_close(up, F.interpolate(z, scale_factor=4))
    assert not Tiles.plan((8, 8, 8), (16, 16, 16), 0.25).tiled


@pytest.fixture(scope="module", params=["rflow", "ddpm"])
def sampler_source(request, backbone):
    """The demo backbone (rectified flow), or one with MAISI v1's DDPM schedule (DDIM sampling)."""
    if request.param == "rflow":
        return backbone
    from diffugts.models import get_config
    from diffugts.networks.backbones import build_backbone

    return build_backbone({**get_config("demo"), "scheduler": get_config("maisi-ct-v1")["scheduler"]})


def test_renoise_follows_the_forward_path(sampler_source):
    sampler = sampler_source.sampler((16, 16, 16))
    z0 = torch.full((1, 4, 16, 32, 32), 2.0)
    z_from = sampler.add_noise(z0, torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)), 300.0)
    z_to = renoise(sampler, z_from, 300.0, 500.0, torch.Generator().manual_seed(1))
    # Same marginal as noising z0 straight to t = 500 (rectified flow: mean 1.0, sd 0.5).
    mean = sampler.add_noise(z0, torch.zeros_like(z0), 500.0).mean().item()
    sd = sampler.add_noise(torch.zeros(1, 1, 1, 1, 1), torch.ones(1, 1, 1, 1, 1), 500.0).item()
    assert abs(z_to.mean().item() - mean) < 0.01 and abs(z_to.std().item() - sd) < 0.01


def test_known_latent_is_kept_exactly_with_either_scheduler(sampler_source):
    local = LocalBackbone(sampler_source)
    x = torch.rand(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 4, 8, 8, dtype=torch.bool)
    mask[..., 1:3, 2:5, 3:6] = True
    out = inpaint(local, x, mask, DEMO_SPACING, strength=0.6, steps=5, jumps=1, seed=0, show_progress=False)
    keep = ~F.interpolate(mask.float(), scale_factor=4).bool()
    torch.testing.assert_close(out[keep], local.decode(local.encode(x))[keep])  # z = z0 there at t = 0
    assert (out - local.decode(local.encode(x)))[~keep].abs().mean() > 0.01


def test_empty_mask_means_nothing_to_inpaint(tmp_path, package):
    study, lesion, geometry, volume = make_study(tmp_path / "study")
    write_image(tmp_path / "empty.nii.gz", np.zeros(volume.shape, np.uint8), geometry)
    summary = synthesize(
        study, str(package.root), tmp_path / "out", mask=tmp_path / "empty.nii.gz", show_progress=False
    )
    assert summary["nothing_to_inpaint"] is True and "nothing to inpaint" in summary["note"]
    assert np.array_equal(read(tmp_path / "out" / "pseudo_healthy.nii.gz"), volume)
    assert not read(tmp_path / "out" / "difference.nii.gz").any()
    assert json.loads((tmp_path / "out" / "synthesis.json").read_text())["mask"]["dilated_voxels"] == 0


@pytest.mark.parametrize("case", ["shape", "values", "geometry", "garbage", "missing"])
def test_bad_masks_are_one_input_error(tmp_path, package, case):
    study, lesion, geometry, volume = make_study(tmp_path / "study")
    path = tmp_path / "mask.nii.gz"
    if case == "shape":
        write_image(
            path, np.zeros((32, 64, 60), np.uint8), Geometry(geometry.origin, geometry.spacing, np.eye(3), (32, 64, 60))
        )
    elif case == "values":
        write_image(path, (lesion * 2).astype(np.uint8), geometry)
    elif case == "geometry":
        write_image(
            path, lesion.astype(np.uint8), Geometry(geometry.origin + 5, geometry.spacing, np.eye(3), geometry.shape)
        )
    elif case == "garbage":
        path.write_bytes(b"not a nifti")
    expected = {
        "shape": "does not match the study",
        "values": "not binary",
        "geometry": "differs from the study",
        "garbage": "unreadable mask",
        "missing": "not found",
    }[case]
    with pytest.raises(InputError, match=expected) as err:
        synthesize(study, str(package.root), tmp_path / "out", mask=path, show_progress=False)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "out" / "synthesis.json").exists()


def test_fidelity_on_known_values():
    shape = (10, 10, 10)
    organ = np.zeros(shape, np.int32)
    organ[1:9, 1:9, 1:9] = 4
    lesions = np.zeros(shape, np.int32)
    lesions[3:5, 3:5, 3:5] = 1  # darker lesion in organ 4
    lesions[6:8, 6:8, 6:8] = 2  # brighter lesion in organ 4
    x = np.where(organ == 4, 50.0, -100.0).astype(np.float32)
    x[lesions == 1] = 10.0
    x[lesions == 2] = 90.0
    h = x.copy()
    h[lesions == 1] = 40.0  # 30 of the 40 HU back towards the organ: 0.75
    h[lesions == 2] = 50.0  # fully healthy: 1.0
    dilated = np.zeros(shape, bool)
    dilated[2:9, 2:9, 2:9] = True
    h[2, 2, 2] = 55.0  # inside the dilated mask, not in a lesion: no effect on the figures
    twin = np.where(organ == 4, 50.0, -100.0).astype(np.float32)
    truth = GroundTruth(lesions, organ, [{"id": 1, "organ_label": 4}, {"id": 2, "organ_label": 4}], healthy=twin)
    fid = fidelity(x, h, truth, dilated)
    assert [e["fidelity"] for e in fid["lesions"]] == [0.75, 1.0]
    assert fid["mean_fidelity"] == 0.875 and fid["outside_mask_mae"] == 0.0
    assert fid["lesions"][0]["healthy_organ_mean"] == 50.0 and fid["lesions"][0]["covered_fraction"] == 1.0
    assert fid["lesions"][0]["mae_to_healthy_input"] == 40.0 and fid["lesions"][0]["mae_to_healthy"] == 10.0
    assert fid["mae_to_healthy_input"] == 40.0 and fid["mae_to_healthy"] == 5.0
    # A change outside the dilated mask shows up; a lesion without contrast has no fidelity.
    h[0, 0, 0] += 100.0
    x[lesions == 2] = 50.0
    fid = fidelity(x, h, truth, dilated)
    assert fid["outside_mask_mae"] == pytest.approx(100.0 / (1000 - dilated.sum()), abs=1e-6)
    assert fid["lesions"][1]["fidelity"] is None and fid["mean_fidelity"] == 0.75


def test_phantom_ground_truth_rebuilds_the_healthy_twin(tmp_path, package, backbone):
    from diffugts.phantom import CaseSpec, generate_case, write_case
    from diffugts.phantom.truth import load_phantom_truth

    case = generate_case(
        CaseSpec(
            seed=3, index=1, shape=(32, 64, 64), lesion_types=("hypodense",), organs=("liver",), healthy_fraction=0.0
        )
    )
    folder = write_case(case, tmp_path, dicom=False)
    geometry = Geometry(case.grid.origin, case.grid.spacing, np.eye(3), case.image.shape)
    truth = load_phantom_truth(folder, geometry, case.image)
    assert truth.healthy is not None and not truth.notes and truth.lesions[0]["organ"] == "liver"
    fid = fidelity(case.image, truth.healthy, truth, truth.lesion_map > 0)
    assert fid["mae_to_healthy"] == 0.0 and fid["mae_to_healthy_input"] > 10
    assert fid["lesions"][0]["fidelity"] > 0.5  # the twin is the healthy answer
    other = load_phantom_truth(folder, geometry, case.image + 7)  # not this study's twin
    assert other.healthy is None and "does not match" in other.notes[0]
    # End to end: the study of that case, its lesion map as the mask, fidelity in synthesis.json.
    study = tmp_path / "study"
    with atomic.staging_dir(study, marker="series.json") as stage:
        write_image(stage / "volume.nii", case.image, geometry, compress=False)
        atomic.write_json(
            stage / "series.json", {"modality": "CT", "volume": {"file": "volume.nii", **geometry.as_dict()}}
        )
    write_image(tmp_path / "mask.nii.gz", (case.lesion_map > 0).astype(np.uint8), geometry)
    summary = synthesize(
        study,
        str(package.root),
        tmp_path / "out",
        mask=tmp_path / "mask.nii.gz",
        params=SynthesisParams(steps=1, context_mm=16.0),
        ground_truth=folder,
        backbone=backbone,
        show_progress=False,
    )
    fid = summary["fidelity"]
    assert [e["id"] for e in fid["lesions"]] == [1, 2] and fid["outside_mask_mae"] == 0.0
    assert all(e["covered_fraction"] == 1.0 for e in fid["lesions"]) and fid["mae_to_healthy"] > 0


def test_cli_from_an_attention_artifact(tmp_path, package, capsys):
    study, lesion, geometry, volume = make_study(tmp_path / "study")
    att = tmp_path / "attention"
    (att / "masks").mkdir(parents=True)
    write_image(att / "masks" / "00-a.nii.gz", lesion.astype(np.uint8), geometry)
    write_image(att / "masks" / "01-b.nii.gz", np.zeros(volume.shape, np.uint8), geometry)
    atomic.write_json(
        att / "attention.json",
        {
            "targets": [
                {"index": 0, "prompt": {"text": "liver tumor"}, "mask": "masks/00-a.nii.gz"},
                {"index": 1, "prompt": {"text": "kidney tumor"}, "mask": "masks/01-b.nii.gz"},
            ]
        },
    )
    rc = main(
        [
            "-q",
            "synthesize",
            str(study),
            "--model",
            str(package.root),
            "--attention",
            str(att),
            "--target",
            "1",
            "--out",
            str(tmp_path / "empty"),
        ]
    )
    assert rc == 0 and "nothing to inpaint" in capsys.readouterr().out
    write_image(tmp_path / "lesion.nii.gz", lesion.astype(np.uint8), geometry)
    write_image(tmp_path / "organ.nii.gz", (volume > -500).astype(np.uint8) * 4, geometry)
    rc = main(
        [
            "-q",
            "synthesize",
            str(study),
            "--model",
            str(package.root),
            "--attention",
            str(att),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "2",
            "--context-mm",
            "16",
            "--device",
            "cpu",
            "--lesion-mask",
            str(tmp_path / "lesion.nii.gz"),
            "--organ-mask",
            str(tmp_path / "organ.nii.gz"),
        ]
    )
    assert rc == 0 and "inpainted" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "synthesis.json").read_text())
    assert [t["prompt"] for t in saved["mask"]["targets"]] == ["liver tumor", "kidney tumor"]
    assert saved["mask"]["coarse_voxels"] == lesion.sum()
    [entry] = saved["fidelity"]["lesions"]
    assert entry["organ_label"] == 4 and entry["voxels"] == lesion.sum() and entry["fidelity"] is not None
    assert entry["healthy_organ_mean"] == pytest.approx(40.0, abs=1.0)


def test_cli_bad_mask_exits_2_with_one_line(tmp_path, package, capsys):
    study, lesion, geometry, volume = make_study(tmp_path / "study")
    write_image(
        tmp_path / "mask.nii.gz", np.zeros((8, 8, 8), np.uint8), Geometry((0, 0, 0), (1, 1, 1), np.eye(3), (8, 8, 8))
    )
    rc = main(
        [
            "synthesize",
            str(study),
            "--model",
            str(package.root),
            "--mask",
            str(tmp_path / "mask.nii.gz"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("diffugts: error: ") and "does not match the study" in err[0]


def test_defaults_agree_across_library_cli_and_component():
    from components.synthesize import synthesize as component
    from diffugts.cli import build_parser

    p = SynthesisParams()
    args = build_parser().parse_args(["synthesize", "s", "--model", "m", "--mask", "x", "--out", "o"])
    for name in ("dilation_mm", "strength", "steps", "jumps", "seed", "context_mm", "feather_mm", "tile"):
        assert getattr(args, name) == getattr(p, name), name
    inputs = component.component_spec.inputs
    for name in ("dilation_mm", "strength", "steps", "jumps", "seed", "context_mm", "feather_mm"):
        assert inputs[name].default == getattr(p, name), name
    assert {"study", "attention", "model_uri"} <= set(inputs)
    assert "synthesis" in component.component_spec.outputs


def test_harmonisation_removes_a_generator_bias(backbone, monkeypatch):
    """A generator that returns the input brighter by a constant: harmonised H matches x in
    the ring around the mask (so x - H is the lesion alone); without it the bias stays."""
    import diffugts.stages.synthesize.stage as synthesis
    from diffugts.stages.preprocess import Preprocessing
    from diffugts.stages.synthesize import pseudo_healthy

    def biased(backbone, x, mask, spacing, *, stats, **kwargs):
        stats.update(encode_s=0.0, denoise_s=0.0, decode_s=0.0, tiles=1, denoiser_calls=0, timesteps=[])
        return x + 0.05  # 0.05 of the CT window = +30 HU for the demo window

    monkeypatch.setattr(synthesis, "inpaint", biased)
    from diffugts.models import get_config

    prep = Preprocessing.from_dict(get_config("demo")["preprocessing"])
    rng = np.random.default_rng(0)
    volume = (60 + rng.normal(0, 5, (24, 48, 48))).astype(np.float32)
    lesion = np.zeros(volume.shape, bool)
    lesion[10:14, 20:28, 20:28] = True
    volume[lesion] -= 50
    g = Geometry((0, 0, 0), DEMO_SPACING, np.eye(3), volume.shape)
    region = make_region(lesion, tuple(DEMO_SPACING[::-1]), 8.0, 4.0)
    ring = region.dilated & ~region.mask & (region.weight >= 1)
    plain, _ = pseudo_healthy(volume, g, "CT", region, backbone, prep, SynthesisParams(harmonise=False))
    fixed, info = pseudo_healthy(volume, g, "CT", region, backbone, prep, SynthesisParams())
    assert np.median(plain[ring] - volume[ring]) > 20
    assert abs(np.median(fixed[ring] - volume[ring])) < 3
    assert info["harmonise_offset"] < -20
    outside = ~region.dilated
    np.testing.assert_array_equal(fixed[outside], volume[outside])


def test_voxels_beyond_the_ct_window_keep_their_values_instead_of_being_clamped(backbone, monkeypatch):
    """Lung (-850 HU) and bone (+700 HU) inside the inpainted region, outside the model's CT
    window (-250..350 for the demo): a generator that reproduces its (clipped) input must give
    them back as they were, not clamped to the window's edges; soft tissue is still replaced."""
    import diffugts.stages.synthesize.stage as synthesis
    from diffugts.models import get_config
    from diffugts.stages.preprocess import Preprocessing
    from diffugts.stages.synthesize import pseudo_healthy

    def identity(backbone, x, mask, spacing, *, stats, **kwargs):
        stats.update(encode_s=0.0, denoise_s=0.0, decode_s=0.0, tiles=1, denoiser_calls=0, timesteps=[])
        return x + 0.01  # 6 HU brighter: soft tissue visibly comes from the generator

    monkeypatch.setattr(synthesis, "inpaint", identity)
    prep = Preprocessing.from_dict(get_config("demo")["preprocessing"])
    volume = np.full((24, 48, 48), 60.0, np.float32)
    volume[:, :, :16] = -850.0  # lung
    volume[:, :, 40:] = 700.0  # bone
    coarse = np.zeros(volume.shape, bool)
    coarse[8:16, 10:38, 4:44] = True  # spans lung, soft tissue and bone
    g = Geometry((0, 0, 0), DEMO_SPACING, np.eye(3), volume.shape)
    region = make_region(coarse, tuple(DEMO_SPACING[::-1]), 4.0, 2.0)
    pseudo, info = pseudo_healthy(volume, g, "CT", region, backbone, prep, SynthesisParams(harmonise=False))
    inside = region.weight >= 1
    np.testing.assert_array_equal(pseudo[inside & (volume < -250)], volume[inside & (volume < -250)])
    np.testing.assert_array_equal(pseudo[inside & (volume > 350)], volume[inside & (volume > 350)])
    soft = inside & (volume == 60.0)
    soft[:, :, 14:18] = soft[:, :, 38:42] = False  # the resampled edges between tissues
    assert np.allclose(pseudo[soft], 66.0, atol=0.5)
    assert info["kept_beyond_window_voxels"] > 0
    assert np.abs(pseudo - volume).max() < 20  # before the fix: |x - H| up to 600 HU here
