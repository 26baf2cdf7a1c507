"""The frozen backbone: MONAI's MAISI classes at the demo configuration, random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiGroupNorm3D

from diffugts.errors import ConfigError
from diffugts.models import get_config
from diffugts.models.configs import CONFIGS
from diffugts.networks.backbones import build_backbone
from diffugts.networks.backbones.maisi import encoder_level_ends


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return build_backbone(get_config("demo"))


def test_encoder_level_ends_match_the_official_block_list():
    # conv, res, res, down, res, res, down, res, res, norm, conv (docs/research/maisi.md)
    assert encoder_level_ends([2, 2, 2]) == [2, 5, 8]
    assert encoder_level_ends([1, 1, 1]) == [1, 3, 5]


def test_features_shapes_follow_the_specs(demo):
    x = torch.rand(1, 1, 32, 64, 64)
    feats = demo.features(x, (2.75, 2.75, 4.0))
    specs = demo.feature_specs()
    assert len(feats) == len(specs)
    for f, spec in zip(feats, specs):
        assert f.shape[1] == spec.channels
        assert tuple(f.shape[2:]) == tuple(n // spec.stride for n in x.shape[2:]), spec


def test_features_are_deterministic_with_a_seed(demo):
    x = torch.rand(1, 1, 32, 64, 64)
    a = demo.features(x, (2.75, 2.75, 4.0), generator=torch.Generator().manual_seed(3))
    b = demo.features(x, (2.75, 2.75, 4.0), generator=torch.Generator().manual_seed(3))
    c = demo.features(x, (2.75, 2.75, 4.0), generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[-1], c[-1])  # denoiser features see the noise ...
    assert torch.equal(a[0], c[0])  # ... encoder features do not


def test_encode_decode_and_encoder_levels(demo):
    x = torch.rand(1, 1, 32, 64, 64)
    z = demo.encode(x)
    assert z.shape == (1, 4, 8, 16, 16)
    assert demo.decode(z).shape == x.shape
    levels = demo.encoder_features(x)
    assert [tuple(f.shape[1:2]) for f in levels] == [(16,), (32,), (32,)]


def test_fast_group_norm_equals_maisi_group_norm():
    torch.manual_seed(0)
    cfg = get_config("demo")["vae"]
    reference = AutoencoderKlMaisi(**{**cfg, "num_splits": 1})
    fast = build_backbone(get_config("demo")).vae
    fast.load_state_dict(reference.state_dict())
    assert any(isinstance(m, MaisiGroupNorm3D) for m in fast.modules())
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(reference.encode(x)[0], fast.encode(x)[0], atol=1e-5)


def test_rflow_sampler_schedule(demo):
    s = demo.sampler((8, 16, 16))
    ts = s.timesteps(0.5, 10)
    assert ts[0] == 500 and len(ts) == 10 and all(a > b for a, b in zip(ts, ts[1:]))
    z0, noise = torch.zeros(1, 4, 8, 16, 16), torch.ones(1, 4, 8, 16, 16)
    assert torch.allclose(s.add_noise(z0, noise, 250.0), torch.full_like(z0, 0.25))
    # One Euler step with velocity (x0 - noise) from t to 0 recovers x0.
    z_t = s.add_noise(z0, noise, 250.0)
    assert torch.allclose(s.step(z0 - noise, 250.0, 0.0, z_t), z0, atol=1e-6)


@pytest.mark.slow  # the full-size networks: 200 M parameters each
@pytest.mark.parametrize("name", ["maisi-ct", "maisi-ct-v1"])
def test_official_configurations_build_on_cpu(name):
    backbone = build_backbone(get_config(name))
    n = sum(p.numel() for p in backbone.parameters())
    # VAE 20,944,897 + UNet (v2 180,500,868 / v1 169,370,884): docs/research/maisi.md
    assert n == {"maisi-ct": 201_445_765, "maisi-ct-v1": 190_315_781}[name]
    assert CONFIGS[name]["unet"]["use_flash_attention"] is True  # the official value is kept
    assert not backbone.unet.down_blocks[2].attentions[0].attn.use_flash_attention  # ... but off on CPU


def test_unknown_configuration():
    with pytest.raises(ConfigError, match="unknown backbone configuration"):
        get_config("nope")


def test_unoptimized_backbone_is_the_same_network(demo):
    """optimized=False (the GPU benchmark's fp32 baseline) keeps MONAI's loop GroupNorm and
    computes the same features from the same weights."""
    from diffugts.networks.backbones.maisi import MaisiBackbone

    plain = MaisiBackbone(get_config("demo"), optimized=False)
    plain.vae.load_state_dict(demo.vae.state_dict())
    plain.unet.load_state_dict(demo.unet.state_dict())
    assert all("forward" not in vars(m) for m in plain.vae.modules() if isinstance(m, MaisiGroupNorm3D))
    assert any("forward" in vars(m) for m in demo.vae.modules() if isinstance(m, MaisiGroupNorm3D))
    x = torch.rand(1, 1, 16, 32, 32)
    for a, b in zip(plain.features(x, (1.5, 1.5, 1.5)), demo.features(x, (1.5, 1.5, 1.5))):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_default_aova_features_follow_the_backbone(demo):
    from diffugts.train.recipe import AOVA_FEATURES, default_features

    assert default_features(demo) == AOVA_FEATURES
    two_d = build_backbone(get_config("demo-2d"))
    names = [s.name for s in two_d.feature_specs()]
    assert default_features(two_d) == names[1:]
    two_d.feature_index(default_features(two_d))  # every name exists
