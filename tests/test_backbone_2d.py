"""The 2D diffusers family (diffugts.networks.backbones.diffusers2d) with tiny random-weight models
built from the ``demo-2d`` configuration and the offline MiniLM text encoder: shapes, the
cross-attention maps, inpainting, packages, and `diffugts segment` end to end."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffugts.errors import ConfigError, InputError
from diffugts.models import get_config, open_package
from diffugts.models.create import create_random, verify
from diffugts.networks.backbones import build_backbone, load_backbone
from diffugts.networks.backbones.cross_attention import (
    CaptureProcessor,
    cross_attention_maps,
    training_free_probability,
)
from diffugts.networks.backbones.diffusers2d import Diffusers2DBackbone
from diffugts.networks.text import make_target
from diffugts.stages.synthesize.inpaint import inpaint

torch.set_num_threads(1)

K, J, I = 8, 32, 32  # noqa: E741 (the kji axes) -- a small volume: 8 slices of 32 x 32


def volume(seed: int = 0) -> torch.Tensor:
    """A smooth blob on a gradient, on [0, 1]: structure for the networks to see."""
    g = torch.Generator().manual_seed(seed)
    k, j, i = torch.meshgrid(
        torch.linspace(-1, 1, K), torch.linspace(-1, 1, J), torch.linspace(-1, 1, I), indexing="ij"
    )
    blob = torch.exp(-((j - 0.2) ** 2 + (i + 0.1) ** 2 + (k * 0.5) ** 2) / 0.1)
    x = 0.3 + 0.2 * i + 0.4 * blob + 0.02 * torch.rand((K, J, I), generator=g)
    return x.clamp(0, 1)[None, None]


@pytest.fixture(scope="module")
def backbone() -> Diffusers2DBackbone:
    torch.manual_seed(0)
    return build_backbone(get_config("demo-2d"))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return create_random(tmp_path_factory.mktemp("pkg2d") / "demo-2d", "demo-2d", seed=3)


# --- features -------------------------------------------------------------------------------


def test_features_match_their_specs(backbone):
    x = volume()
    feats = backbone.features(x, (2.75, 2.75, 4.0))
    specs = backbone.feature_specs()
    assert [s.name for s in specs] == ["encoder0", "encoder1", "encoder2", "denoiser0", "denoiser1", "cross_attention"]
    assert len(feats) == len(specs)
    for spec, f in zip(specs, feats, strict=True):
        # Stacked back to 3D: every slice kept along K, the in-plane stride as documented.
        assert tuple(f.shape) == (1, spec.channels, K, J // spec.stride, I // spec.stride), spec
        assert torch.isfinite(f).all()
    cross = feats[-1]
    assert cross.shape[1] == len(backbone.probes)
    assert cross.min() >= 0 and cross.max() <= 1 + 1e-5  # attention mass of each probe's words
    assert backbone.feature_index(["cross_attention", "encoder1"]) == [5, 1]
    # Deterministic by default (one seeded noise draw).
    again = backbone.features(x, (2.75, 2.75, 4.0))
    for a, b in zip(feats, again, strict=True):
        assert torch.equal(a, b)


def test_slice_batches_do_not_change_results(backbone):
    x = volume(1)
    ref = backbone.features(x, None)
    enc_ref = backbone.encode(x)
    backbone.slice_batch = 3  # 8 slices in batches of 3, 3, 2
    try:
        feats = backbone.features(x, None)
        enc = backbone.encode(x)
    finally:
        backbone.slice_batch = 16
    for a, b in zip(ref, feats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc, enc_ref, atol=1e-5, rtol=1e-4)


def test_features_are_per_slice(backbone):
    """Changing one slice changes that slice's features only (no context slices)."""
    x = volume(2)
    y = x.clone()
    y[:, :, 5] = 1 - y[:, :, 5]
    fx, fy = backbone.encoder_features(x), backbone.encoder_features(y)
    for a, b in zip(fx, fy, strict=True):
        diff = (a - b).abs().amax(dim=(0, 1, 3, 4))
        assert diff[5] > 1e-3
        assert torch.all(diff[[0, 1, 2, 3, 4, 6, 7]] == 0)


def test_context_slices_feed_neighbours(tmp_path):
    cfg = get_config("demo-2d")
    cfg["context_slices"] = 1
    cfg["vae"] = {**cfg["vae"], "in_channels": 3, "out_channels": 3}
    torch.manual_seed(0)
    bb = build_backbone(cfg)
    x = volume(3)
    y = x.clone()
    y[:, :, 5] = 1 - y[:, :, 5]
    diff = (bb.encoder_features(x)[0] - bb.encoder_features(y)[0]).abs().amax(dim=(0, 1, 3, 4))
    assert torch.all(diff[[4, 5, 6]] > 1e-4)  # slice 5 is context of its two neighbours
    assert torch.all(diff[[0, 1, 2, 3, 7]] == 0)
    assert tuple(bb.decode(bb.encode(x)).shape) == tuple(x.shape)  # the centre channel comes back
    cfg["vae"]["in_channels"] = 1
    with pytest.raises(ConfigError, match="3 input channels"):
        build_backbone(cfg)


# --- cross-attention ------------------------------------------------------------------------


def test_cross_attention_maps(backbone):
    x = volume()
    prompts = ["liver tumor", "normal kidney tissue"]
    before = {k: type(v) for k, v in backbone.unet.attn_processors.items()}
    out = cross_attention_maps(backbone, x, prompts, return_tokens=True)
    # The capture processors are only installed for the capture.
    assert {k: type(v) for k, v in backbone.unet.attn_processors.items()} == before
    assert not any(isinstance(v, CaptureProcessor) for v in backbone.unet.attn_processors.values())
    assert out.tokens == [["[CLS]", "liver", "tumor", "[SEP]"], ["[CLS]", "normal", "kidney", "tissue", "[SEP]"]]
    assert tuple(out.maps.shape) == (1, 2, K, J, I)
    assert out.maps.min() >= 0 and out.maps.max() <= 1 + 1e-5
    for p, tokens in enumerate(out.tokens):
        tm = out.token_maps[p]
        assert tuple(tm.shape) == (1, len(tokens), K, J, I)
        assert tm.min() >= 0
        # A softmax over the tokens, averaged and linearly upsampled: sums to 1 everywhere.
        torch.testing.assert_close(tm.sum(1), torch.ones(1, K, J, I), atol=1e-4, rtol=0)
        # The prompt's map is the mass on its words (special tokens excluded).
        torch.testing.assert_close(out.maps[:, p], tm[:, 1:-1].sum(1), atol=1e-5, rtol=0)
    # Different prompts give different maps, and maps vary over the image.
    assert (out.maps[:, 0] - out.maps[:, 1]).abs().max() > 1e-3
    assert out.maps[0, 0].std() > 1e-4
    # Another set of timesteps is another aggregation.
    other = cross_attention_maps(backbone, x, prompts, noise=(0.8,))
    assert (other.maps - out.maps).abs().max() > 1e-4


def test_cross_attention_maps_use_every_layer(backbone):
    """Each cross-attention layer reports once per UNet call (4 in demo-2d: one down, the
    middle, two up)."""
    from diffugts.networks.backbones.cross_attention import AttentionStore

    store = AttentionStore((8, 8))
    hidden, mask = backbone._context(["tumor"], 2)
    with backbone._capture(store):
        backbone._unet(torch.randn(2, 4, 8, 8), 100, hidden, mask)
    names = [n for n in backbone.unet.attn_processors if n.endswith("attn2.processor")]
    assert store.layers == len(names) == 4
    assert tuple(store.mean().shape) == (2, 3, 8, 8)  # (slices, [CLS] tumor [SEP], latent grid)


def test_training_free_probability(backbone):
    prob = training_free_probability(backbone, volume(), make_target("liver tumor"))
    assert tuple(prob.shape) == (1, K, J, I)
    assert prob.min() >= 0 and prob.max() <= 1
    assert prob.std() > 1e-4


# --- inpainting -----------------------------------------------------------------------------


def test_inpainting_changes_only_the_masked_slab(backbone):
    x = volume(4)
    s = backbone.latent_stride
    mask = torch.zeros(1, 1, K // s, J // s, I // s)
    mask[..., 1, 2:6, 2:6] = 1  # slices 4..7, the middle of the plane
    stats = {}
    out = inpaint(backbone, x, mask, None, strength=0.8, steps=4, jumps=1, seed=0, show_progress=False, stats=stats)
    assert tuple(out.shape) == tuple(x.shape)
    assert stats["denoiser_calls"] == 8
    recon = backbone.decode(backbone.encode(x))
    # Slices of unmasked slabs: the latent is z0 exactly, and the decoder works per slice, so
    # they are the plain autoencoder reconstruction.
    torch.testing.assert_close(out[:, :, :4], recon[:, :, :4], atol=1e-5, rtol=0)
    # Inside the mask the denoiser regenerated the image.
    inside = (out[:, :, 4:, 12:20, 12:20] - recon[:, :, 4:, 12:20, 12:20]).abs().mean()
    assert inside > 1e-3


def test_slab_packing_round_trips(backbone):
    z = torch.randn(2 * K, 4, 8, 8)
    packed = backbone._pack(z, 2)
    assert tuple(packed.shape) == (2, 4 * backbone.latent_stride, K // backbone.latent_stride, 8, 8)
    assert torch.equal(backbone._unpack(packed), z)
    with pytest.raises(ValueError, match="multiple of 4"):
        backbone.encode(torch.rand(1, 1, 6, 32, 32))


def test_native_scheduler(backbone):
    cfg = {**backbone.config, "sampler": "native"}
    sampler = Diffusers2DBackbone.sampler(type("B", (), {"config": cfg})(), None)
    ts = sampler.timesteps(0.5, 5)
    assert len(ts) == 5 and ts[0] <= 500 and ts == sorted(ts, reverse=True)
    z = torch.randn(1, 16, 2, 8, 8)
    z = sampler.step(torch.zeros_like(z), ts[0], ts[1], z)  # in order: fine
    with pytest.raises(ConfigError, match="once, in order"):
        sampler.step(torch.zeros_like(z), ts[0], ts[1], z)  # a RePaint jump back
    bad = {**cfg, "scheduler": {"class": "EulerDiscreteScheduler", "args": {}}}
    with pytest.raises(ConfigError, match="not supported for inpainting"):
        Diffusers2DBackbone.sampler(type("B", (), {"config": bad})(), None)


# --- packages -------------------------------------------------------------------------------


def test_package_round_trip(package, backbone):
    pkg = verify(package.root)  # checksums, then every network loaded strictly
    assert pkg.family == "diffusers2d"
    assert pkg.manifest["backbone"]["attention"]["probes"] == backbone.probes
    assert set(pkg.manifest["files"]) == {"vae.safetensors", "unet.safetensors"}
    loaded = load_backbone(pkg)
    torch.manual_seed(3)
    ref = build_backbone(get_config("demo-2d"))
    for (k, a), (_, b) in zip(ref.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x = volume()
    for a, b in zip(ref.features(x, None), loaded.features(x, None), strict=True):
        assert torch.equal(a, b)


def test_package_checksum_mismatch(package, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(package.root, copy)
    data = bytearray((copy / "unet.safetensors").read_bytes())
    data[-5] ^= 0xFF  # same size, other bytes
    (copy / "unet.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 mismatch"):
        open_package(copy)


def test_package_weights_must_match_config(package, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(package.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backbone"]["unet"]["block_out_channels"] = [16, 32]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="do not match the network configuration"):
        load_backbone(open_package(copy))


def test_cli_create(tmp_path, capsys):
    from diffugts.cli import main

    assert main(["models", "create", "--config", "demo-2d", "--out", str(tmp_path / "p")]) == 0
    assert main(["models", "verify", str(tmp_path / "p")]) == 0
    assert "OK" in capsys.readouterr().out


def test_package_from_s3(s3_env, package, tmp_path, monkeypatch):
    from diffugts.storage import ObjectStore

    monkeypatch.setenv("DIFFUGTS_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{s3_env.bucket}/models-{uuid.uuid4().hex[:8]}/demo-2d"
    ObjectStore().publish_dir(package.root, uri)
    pkg = open_package(uri)
    assert pkg.manifest["backbone"]["family"] == "diffusers2d"
    backbone = load_backbone(pkg)
    assert isinstance(backbone, Diffusers2DBackbone)


# --- importing a diffusers folder -------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "liver", "tumor", "normal", "tissue", "kidney"]


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A diffusers model folder as save_pretrained writes it: the demo-2d networks, the
    model's own tiny BERT text encoder (width 32) and tokenizer, and a DDPM scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    cfg = get_config("demo-2d")
    torch.manual_seed(5)
    UNet2DConditionModel(**{**cfg["unet"], "cross_attention_dim": 32}).save_pretrained(root / "unet")
    AutoencoderKL(**cfg["vae"]).save_pretrained(root / "vae")
    DDPMScheduler.from_config(cfg["scheduler"]["args"]).save_pretrained(root / "scheduler")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(root / "tokenizer")
    BertModel(
        BertConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    ).save_pretrained(root / "text_encoder")
    return root


def test_import_diffusers_folder(diffusers_folder, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from diffugts.cli import main
    from diffugts.models.package import add_networks

    out = tmp_path / "pkg"
    assert main(["models", "import-diffusers", str(diffusers_folder), "--out", str(out), "--sampler", "native"]) == 0
    assert main(["models", "verify", str(out)]) == 0
    capsys.readouterr()
    pkg = open_package(out)
    # The text encoder and tokenizer travel inside the package, hashed with it.
    assert "text_encoder/model.safetensors" in pkg.manifest["files"]
    assert any(f.startswith("tokenizer/") for f in pkg.manifest["files"])
    assert pkg.manifest["backbone"]["scheduler"]["class"] == "DDPMScheduler"
    backbone = load_backbone(pkg)
    ref = UNet2DConditionModel.from_pretrained(diffusers_folder / "unet")
    for (k, a), (_, b) in zip(ref.state_dict().items(), backbone.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # Conditioning goes through the model's own text encoder and tokenizer.
    assert backbone.tokens("liver tumor").tokens == ["[CLS]", "liver", "tumor", "[SEP]"]
    assert backbone.tokens("liver tumor").hidden.shape == (4, 32)
    maps = cross_attention_maps(backbone, volume(), ["liver tumor", "normal tissue"]).maps
    assert tuple(maps.shape) == (1, 2, K, J, I) and maps.min() >= 0
    x = volume()
    mask = torch.zeros(1, 1, K // 4, J // 4, I // 4)
    mask[..., 0, :4, :4] = 1
    out_img = inpaint(backbone, x, mask, None, strength=0.5, steps=3, jumps=0, seed=0, show_progress=False)
    assert tuple(out_img.shape) == tuple(x.shape) and torch.isfinite(out_img).all()

    # Adding heads keeps every file hashed, the text encoder's weights included.
    with_heads = add_networks(pkg, {}, out=tmp_path / "copy")
    assert set(with_heads.manifest["files"]) == set(pkg.manifest["files"])
    weights = tmp_path / "copy" / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 mismatch"):
        open_package(tmp_path / "copy")


def test_import_rejects_other_folders(tmp_path, diffusers_folder):
    import shutil

    from diffugts.models.diffusers_import import import_diffusers

    with pytest.raises(InputError, match="no unet/config.json"):
        import_diffusers(tmp_path, tmp_path / "out")
    bare = tmp_path / "bare"
    shutil.copytree(diffusers_folder, bare, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    with pytest.raises(InputError, match="cross_attention_dim is 32"):  # MiniLM would give 384
        import_diffusers(bare, tmp_path / "out2")


# --- end to end -----------------------------------------------------------------------------

FEATURES_2D = ["encoder1", "encoder2", "denoiser0", "denoiser1", "cross_attention"]


def with_random_heads(pkg, out):
    """The package plus random AOVA (cross-attention maps among its inputs) and refine heads."""
    from diffugts.models.package import add_networks
    from diffugts.networks.aova import AOVAHead
    from diffugts.networks.refine import RefineHead

    specs = {s.name: s.channels for s in build_backbone(pkg.manifest["backbone"]).feature_specs()}
    torch.manual_seed(0)
    aova = AOVAHead([specs[n] for n in FEATURES_2D], text_dim=384, dim=16)
    refine = RefineHead(features=(4, 8, 8, 16, 16, 4))
    return add_networks(
        pkg,
        {
            "aova": ({"config": aova.config, "features": FEATURES_2D, "threshold": 0.5}, aova.state_dict()),
            "refine": ({"config": refine.config, "threshold": 0.5}, refine.state_dict()),
        },
        out=out,
    )


@pytest.mark.slow
def test_segment_end_to_end(package, tmp_path, capsys):
    from diffugts.cli import main
    from diffugts.phantom import CaseSpec, generate_case, write_case

    model = with_random_heads(package, tmp_path / "full")
    spec = CaseSpec(seed=11, index=0, shape=(16, 48, 48), split="seen", healthy_fraction=0.0)
    case = write_case(generate_case(spec), tmp_path / "case")
    out = tmp_path / "seg"
    code = main(
        ["-q", "segment", str(case / "dicom"), "--out", str(out), "--model", str(model.root), "--prompt", "liver tumor"]
    )
    assert code == 0
    assert "'liver tumor':" in capsys.readouterr().out
    for marker in (
        "attention/attention.json",
        "synthesis/synthesis.json",
        "lesions/lesions.json",
        "report/report.json",
    ):
        assert (out / marker).is_file(), marker
    ref = sitk.ReadImage(str(out / "study" / "volume.nii"))
    lesions = json.loads((out / "lesions" / "lesions.json").read_text())
    mask = sitk.ReadImage(str(out / "lesions" / lesions["targets"][0]["mask"]))
    assert mask.GetSize() == ref.GetSize()
    # Whatever the random head masked, nothing outside the inpainted region changed.
    region = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthesis" / "inpaint_mask.nii.gz"))) > 0
    diff = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthesis" / "difference.nii.gz")))
    assert np.all(diff[~region] == 0)

    # Pseudo-healthy synthesis on the 2D backbone from the phantom's true lesion mask.
    from diffugts.config import SynthesisParams
    from diffugts.stages.synthesize import synthesize

    lesion = sitk.ReadImage(str(case / "lesions.nii.gz"))
    binary = sitk.Cast(lesion > 0, sitk.sitkUInt8)
    binary.CopyInformation(ref)
    sitk.WriteImage(binary, str(tmp_path / "mask.nii.gz"))
    summary = synthesize(
        out / "study",
        str(model.root),
        tmp_path / "syn",
        mask=tmp_path / "mask.nii.gz",
        params=SynthesisParams(steps=4),
        show_progress=False,
    )
    assert not summary["nothing_to_inpaint"] and summary["inpainting"]["denoiser_calls"] == 4
    region = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "syn" / "inpaint_mask.nii.gz"))) > 0
    diff = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "syn" / "difference.nii.gz")))
    assert region.sum() > sitk.GetArrayFromImage(binary).sum() > 0  # dilated
    assert np.all(diff[~region] == 0)  # outside: the input, bit for bit
    assert np.abs(diff[region]).mean() > 1.0  # inside: regenerated (HU)
