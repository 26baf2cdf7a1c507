"""Model packages for tests: the demo configuration with random weights and random heads."""

from __future__ import annotations

from pathlib import Path

import torch

from diffugts.aova import AOVAHead
from diffugts.backbones import build_backbone
from diffugts.models.create import create_random
from diffugts.models.package import ModelPackage, add_networks
from diffugts.refine import RefineHead

FEATURES = ["encoder1", "encoder2", "denoiser0", "denoiser1", "denoiser2"]


def random_package(root: Path, heads: bool = True, seed: int = 0) -> ModelPackage:
    pkg = create_random(root / "backbone", "demo", seed=seed)
    if not heads:
        return pkg
    specs = {s.name: s.channels for s in build_backbone(pkg.manifest["backbone"]).feature_specs()}
    torch.manual_seed(seed)
    aova = AOVAHead([specs[n] for n in FEATURES], text_dim=384, dim=16)
    refine = RefineHead(features=(4, 8, 8, 16, 16, 4))
    return add_networks(pkg, {
        "aova": ({"config": aova.config, "features": FEATURES, "threshold": 0.5}, aova.state_dict()),
        "refine": ({"config": refine.config, "threshold": 0.5}, refine.state_dict()),
    }, out=root / "full")
