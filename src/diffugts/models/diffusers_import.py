"""Importing a diffusers-format text-to-image model as a 2D-family package.

A diffusers folder (what ``StableDiffusionPipeline.save_pretrained`` writes, and what most
medical 2D latent diffusion models ship) holds::

    unet/          config.json + diffusion_pytorch_model.safetensors   (UNet2DConditionModel)
    vae/           config.json + diffusion_pytorch_model.safetensors   (AutoencoderKL)
    scheduler/     scheduler_config.json                               (its own scheduler)
    text_encoder/  a transformers model folder                         (optional)
    tokenizer/     a transformers tokenizer folder                     (optional)
    model_index.json                                                   (optional)

The networks are read with diffusers' own ``from_pretrained`` (offline; it converts older key
layouts and ``.bin`` files) and written as our safetensors with a sha256 manifest; the text
encoder and tokenizer folders are copied into the package and hashed with it. Without a
text encoder, the offline MiniLM is used (then the UNet's ``cross_attention_dim`` must be
384). See docs/backbones-2d.md.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

from diffugts.errors import ConfigError, InputError
from diffugts.models.create import DEFAULT_PROMPTS, text_encoder_entry
from diffugts.models.package import ModelPackage, write_package

DEFAULT_PREPROCESSING = {"orientation": "LPS", "ct_window": [-1000, 1000], "mr_percentiles": [0.0, 99.5]}


def _config(model) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def import_diffusers(
    folder,
    out,
    *,
    spacing_mm=(1.0, 1.0, 2.5),
    sampler: str = "ddim",
    prompt: str = "",
    context_slices: int = 0,
    name: str | None = None,
) -> ModelPackage:
    """Convert a diffusers model folder to a package (``spacing_mm`` is x, y, z)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as dlogging

    folder, out = Path(folder), Path(out)
    for sub in ("unet", "vae"):
        if not (folder / sub / "config.json").is_file():
            raise InputError(folder, f"not a diffusers model folder (no {sub}/config.json)")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise InputError(folder, "not a diffusers model folder (no scheduler/scheduler_config.json)")
    dlogging.set_verbosity_error()
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise InputError(folder, f"cannot load the UNet / VAE ({' '.join(str(err).split())[:160]})") from None
    sched = json.loads(sched_file.read_text())
    latent_stride = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_stride = 2 ** (len(unet.config.block_out_channels) - 1)
    slice_px = (
        int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
        * latent_stride
    )

    out.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    text_entry: dict = {}
    if (folder / "text_encoder" / "config.json").is_file():
        for sub in ("text_encoder", "tokenizer"):
            if (folder / sub).is_dir():
                shutil.copytree(folder / sub, out / sub, dirs_exist_ok=True)
                extra += [p.relative_to(out).as_posix() for p in sorted((out / sub).rglob("*")) if p.is_file()]
        text_entry = {"path": "text_encoder"}
        if (folder / "tokenizer").is_dir():
            text_entry["tokenizer"] = "tokenizer"
        tok_cfg = folder / "tokenizer" / "tokenizer_config.json"
        if tok_cfg.is_file() and "CLIP" in json.loads(tok_cfg.read_text()).get("tokenizer_class", ""):
            # Stable Diffusion's convention: always 77 tokens, padding attended.
            text_entry.update(pad="max_length", max_length=77)
    elif unet.config.cross_attention_dim != 384:
        raise InputError(
            folder,
            f"no text_encoder/ and the UNet's cross_attention_dim is "
            f"{unet.config.cross_attention_dim} (the offline MiniLM gives 384)",
        )
    if context_slices and vae.config.in_channels != 2 * context_slices + 1:
        raise ConfigError(f"context_slices={context_slices} needs a VAE with {2 * context_slices + 1} input channels")

    backbone = {
        "config": "diffusers",
        "family": "diffusers2d",
        "vae": _config(vae),
        "unet": _config(unet),
        "scheduler": {
            "class": sched.get("_class_name", "DDPMScheduler"),
            "args": {k: v for k, v in sched.items() if not k.startswith("_")},
        },
        "sampler": sampler,
        "conditioning": {"prompt": prompt},
        "context_slices": int(context_slices),
        "slice_batch": 8,
        "scale_factor": float(vae.config.scaling_factor),
        "feature_noise": 0.05,
    }
    if text_entry:
        backbone["text_encoder"] = text_entry
    manifest: dict[str, Any] = {
        "name": name or folder.name,
        "family": "diffusers2d",
        "backbone": backbone,
        "preprocessing": {
            **DEFAULT_PREPROCESSING,
            "spacing_mm": [float(s) for s in spacing_mm],
            "multiple": latent_stride * unet_stride,
        },
        # Attention tiles: whole slices at the model's native size, a few slabs deep.
        "inference": {"roi_size": [4 * latent_stride, slice_px, slice_px]},
        "text_encoder": text_encoder_entry(),  # the AOVA head's prompt encoder (MiniLM)
        "prompts": {"default": DEFAULT_PROMPTS},
        "networks": {"vae": {}, "unet": {}},
        "provenance": {
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "kind": "imported",
            "diffusers_folder": str(folder),
        },
    }
    return write_package(out, manifest, {"vae": vae.state_dict(), "unet": unet.state_dict()}, extra_files=extra)
