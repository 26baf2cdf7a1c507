"""Model packages for tests: the demo configuration with random weights and random heads."""

from __future__ import annotations

from pathlib import Path

import torch

from diffugts.models.create import create_random
from diffugts.models.package import ModelPackage, add_networks
from diffugts.networks.aova import AOVAHead
from diffugts.networks.backbones import build_backbone
from diffugts.networks.refine import LEGACY_TARGET_CHANNELS, SHARED_CHANNELS, TARGET_CHANNELS, RefineHead
from diffugts.stages.deviation import Fusion

FEATURES = ["encoder1", "encoder2", "denoiser0", "denoiser1", "denoiser2"]


def random_package(root: Path, heads: bool = True, seed: int = 0, fused: bool = False) -> ModelPackage:
    """``fused``: the current head layout (coarse map fused with the organ-relative deviation,
    a refinement head that takes each target's coarse map, deviation and organ); else the
    layout of packages made before it (the head's own map, the coarse map alone)."""
    pkg = create_random(root / "backbone", "demo", seed=seed)
    if not heads:
        return pkg
    specs = {s.name: s.channels for s in build_backbone(pkg.manifest["backbone"]).feature_specs()}
    torch.manual_seed(seed)
    aova = AOVAHead([specs[n] for n in FEATURES], text_dim=384, dim=16)
    channels = TARGET_CHANNELS if fused else LEGACY_TARGET_CHANNELS
    refine = RefineHead(in_channels=SHARED_CHANNELS + len(channels), features=(4, 8, 8, 16, 16, 4))
    aova_entry = {"config": aova.config, "features": FEATURES, "threshold": 0.5}
    refine_entry = {"config": refine.config, "threshold": 0.5}
    if fused:
        # Weights that make the random head's organ map matter: |z| counts, the bias is low.
        aova_entry["fusion"] = Fusion(0.5, 1.0, -2.0).as_dict()
        refine_entry["target_channels"] = list(channels)
    return add_networks(
        pkg,
        {"aova": (aova_entry, aova.state_dict()), "refine": (refine_entry, refine.state_dict())},
        out=root / ("fused" if fused else "full"),
    )
