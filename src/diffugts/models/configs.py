"""Network configurations of the MAISI backbone family, as plain dicts for MONAI's classes.

``maisi-ct`` is NVIDIA MAISI v2 (rectified flow), ``maisi-ct-v1`` MAISI v1 (DDPM): the
official numbers of ``generation/maisi/configs/config_maisi3d-rflow.json`` and
``config_maisi3d-ddpm.json`` in github.com/Project-MONAI/tutorials (commits 9f6d19f and
a056700; see docs/research/maisi.md for every source). ``demo`` is the same classes, tiny,
for CPU: it is what `make demo-model` trains on the phantom world. ``demo-2d`` is a tiny
model of the 2D diffusers family (:mod:`diffugts.networks.backbones.diffusers2d`), random weights only.

Two runtime flags of the official configs are not architecture: ``use_flash_attention``
(refuses to build without CUDA) and ``norm_float16`` (breaks the VAE on CPU). They change no
weight and are switched per device by :mod:`diffugts.networks.backbones.maisi`.
"""

from __future__ import annotations

import copy

_MAISI_VAE = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "num_channels": [64, 128, 256],
    "num_res_blocks": [2, 2, 2],
    "norm_num_groups": 32,
    "norm_eps": 1e-06,
    "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "use_checkpointing": False,
    "use_convtranspose": False,
    "norm_float16": True,
    "num_splits": 4,
    "dim_split": 1,
}

_MAISI_UNET_V2 = {
    "spatial_dims": 3,
    "in_channels": 4,
    "out_channels": 4,
    "num_channels": [64, 128, 256, 512],
    "attention_levels": [False, False, True, True],
    "num_head_channels": [0, 0, 32, 32],
    "num_res_blocks": 2,
    "use_flash_attention": True,
    "include_top_region_index_input": False,
    "include_bottom_region_index_input": False,
    "include_spacing_input": True,
    "num_class_embeds": 128,
    "resblock_updown": True,
    "include_fc": True,
}

_MAISI_UNET_V1 = {
    **{k: v for k, v in _MAISI_UNET_V2.items() if k not in ("num_class_embeds",)},
    "include_top_region_index_input": True,
    "include_bottom_region_index_input": True,
    "resblock_updown": False,
    "include_fc": False,
}

CONFIGS: dict[str, dict] = {
    "maisi-ct": {
        "family": "maisi",
        "vae": _MAISI_VAE,
        "unet": _MAISI_UNET_V2,
        "scheduler": {
            "class": "RFlowScheduler",
            "args": {
                "num_train_timesteps": 1000,
                "use_discrete_timesteps": False,
                "use_timestep_transform": True,
                "sample_method": "uniform",
            },
        },
        # CT class label of MAISI v2; spacing is fed as mm x 100 (official scripts).
        "conditioning": {"spacing": True, "class_label": 1, "body_region": None},
        "preprocessing": {
            "spacing_mm": [1.5, 1.5, 1.5],
            "orientation": "RAS",
            "ct_window": [-1000, 1000],
            "mr_percentiles": [0.0, 99.5],
            "multiple": 32,
        },
    },
    "maisi-ct-v1": {
        "family": "maisi",
        "vae": {**_MAISI_VAE, "num_splits": 8},
        "unet": _MAISI_UNET_V1,
        "scheduler": {
            "class": "DDPMScheduler",
            "args": {
                "num_train_timesteps": 1000,
                "schedule": "scaled_linear_beta",
                "beta_start": 0.0015,
                "beta_end": 0.0195,
                "clip_sample": False,
            },
        },
        # Abdomen top and bottom region (one-hot x 100, order head/neck, chest, abdomen, lower body).
        "conditioning": {"spacing": True, "class_label": None, "body_region": [[0, 0, 1, 0], [0, 0, 1, 0]]},
        "preprocessing": {
            "spacing_mm": [1.5, 1.5, 1.5],
            "orientation": "RAS",
            "ct_window": [-1000, 1000],
            "mr_percentiles": [0.0, 99.5],
            "multiple": 32,
        },
    },
    "demo": {
        "family": "maisi",
        "vae": {
            **_MAISI_VAE,
            "num_channels": [16, 32, 32],
            "num_res_blocks": [1, 1, 1],
            "norm_num_groups": 8,
            "norm_float16": False,
            "num_splits": 1,
        },
        "unet": {
            **_MAISI_UNET_V2,
            "num_channels": [32, 64, 64],
            "attention_levels": [False, False, True],
            "num_head_channels": [0, 0, 16],
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "use_flash_attention": False,
            "num_class_embeds": None,
            "resblock_updown": False,
            "include_fc": False,
        },
        "scheduler": {
            "class": "RFlowScheduler",
            "args": {
                "num_train_timesteps": 1000,
                "use_discrete_timesteps": False,
                "use_timestep_transform": False,
                "sample_method": "uniform",
            },
        },
        "conditioning": {"spacing": True, "class_label": None, "body_region": None},
        # The phantom world's grid: no resampling for demo studies.
        # A soft-tissue window: lesions differ from their organ by 20-100 HU, which the
        # full [-1000, 1000] range squeezes below what a small VAE keeps.
        "preprocessing": {
            "spacing_mm": [2.75, 2.75, 4.0],
            "orientation": "LPS",
            "ct_window": [-250, 350],
            "mr_percentiles": [0.0, 99.5],
            "multiple": 16,
        },
    },
    # The 2D family (diffusers UNet2DConditionModel + AutoencoderKL, docs/backbones-2d.md), tiny,
    # for CPU tests: the configs are the classes' own keyword arguments (a diffusers folder's
    # config.json). cross_attention_dim 384 is the width of the offline MiniLM text encoder.
    "demo-2d": {
        "family": "diffusers2d",
        "vae": {
            "in_channels": 1,
            "out_channels": 1,
            "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [16, 32, 32],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "scaling_factor": 1.0,
        },
        "unet": {
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "attention_head_dim": 8,
            "cross_attention_dim": 384,
        },
        # The Stable Diffusion training schedule (DDPM, scaled-linear betas); inpainting uses
        # DDIM over it ("sampler": "ddim") or this scheduler itself ("sampler": "native").
        "scheduler": {
            "class": "DDPMScheduler",
            "args": {
                "num_train_timesteps": 1000,
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "prediction_type": "epsilon",
                "clip_sample": False,
                "set_alpha_to_one": False,
                "steps_offset": 1,
            },
        },
        "sampler": "ddim",
        "conditioning": {"prompt": ""},
        "context_slices": 0,
        "slice_batch": 16,
        "attention": {
            "noise": [0.1, 0.3, 0.5],
            "probes": ["tumor", "lesion", "abnormal tissue", "normal tissue", "organ", "background"],
        },
        "preprocessing": {
            "spacing_mm": [2.75, 2.75, 4.0],
            "orientation": "LPS",
            "ct_window": [-250, 350],
            "mr_percentiles": [0.0, 99.5],
            "multiple": 16,
        },
    },
}


def get_config(name: str) -> dict:
    from diffugts.errors import ConfigError

    if name not in CONFIGS:
        raise ConfigError(f"unknown backbone configuration {name!r} (known: {', '.join(CONFIGS)})")
    return copy.deepcopy(CONFIGS[name])
