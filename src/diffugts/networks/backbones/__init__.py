"""Frozen foundation backbones behind one interface (:class:`~diffugts.networks.backbones.base.Backbone`)."""

from __future__ import annotations

import torch

from diffugts.errors import ConfigError
from diffugts.networks.backbones.base import Backbone, FeatureSpec, Sampler

__all__ = ["Backbone", "FeatureSpec", "Sampler", "load_backbone", "build_backbone"]


def build_backbone(backbone_config: dict, device: str | torch.device = "cpu") -> Backbone:
    """A backbone with random weights from a package's ``backbone`` section."""
    family = backbone_config.get("family", "maisi")
    if family == "maisi":
        from diffugts.networks.backbones.maisi import MaisiBackbone

        return MaisiBackbone(
            backbone_config,
            scale_factor=backbone_config.get("scale_factor", 1.0),
            device=device,
            feature_noise=backbone_config.get("feature_noise", 0.05),
        )
    if family == "diffusers2d":
        from diffugts.networks.backbones.diffusers2d import Diffusers2DBackbone

        return Diffusers2DBackbone(backbone_config, device=device)
    raise ConfigError(f"unknown backbone family {family!r}")


def load_backbone(pkg, device: str | torch.device = "cpu") -> Backbone:
    """The package's backbone with its weights, loaded strictly."""
    backbone = build_backbone(pkg.manifest["backbone"], device)
    backbone.package_root = pkg.root  # files the backbone names (a 2D model's text encoder) are relative to it
    backbone.load_weights(pkg.state_dict("vae"), pkg.state_dict("unet"), where=str(pkg.root))
    return backbone.to(device)
