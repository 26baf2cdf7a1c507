"""The MAISI family on MONAI's own classes: AutoencoderKlMaisi + DiffusionModelUNetMaisi.

Weights are those of the official bundle (``diffugts models import-maisi``) or of the demo
recipe; configurations live in :mod:`diffugts.models.configs`. Runtime choices that do not
touch the weights:

- ``MaisiGroupNorm3D`` normalises group by group in a Python loop to save GPU memory; with
  ``norm_float16`` off it computes exactly ``nn.GroupNorm``, so its forward is swapped for
  the fused kernel (3-5x faster; equivalence is tested);
- flash attention is used on CUDA only (MONAI refuses it otherwise); half precision comes
  from bf16 autocast instead of ``norm_float16``;
- on CUDA, synthesis replays the denoiser from a captured CUDA graph (checked against an
  eager call first; :mod:`diffugts.networks.backbones.cuda_graphs`).

``optimized=False`` turns all of these off (the fp32 baseline of the GPU benchmark).
"""

from __future__ import annotations

import math
import types

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiGroupNorm3D
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.schedulers import DDIMScheduler, RFlowScheduler
from torch import nn

from diffugts.errors import ConfigError
from diffugts.networks.backbones.base import Backbone, FeatureSpec, Sampler, ScheduleSampler, grid_size
from diffugts.networks.backbones.cuda_graphs import GraphedCall
from diffugts.networks.loading import load_strict

# Denoiser features are read at this fraction of the noise schedule: enough noise to put
# the denoiser to work, little enough to keep the image's content (DESIGN.md: small t).
DEFAULT_FEATURE_NOISE = 0.05


def build_vae(config: dict, device: torch.device, optimized: bool = True) -> AutoencoderKlMaisi:
    cfg = dict(config)
    cfg["norm_float16"] = False  # bf16 autocast instead (see module docstring)
    if device.type != "cuda":
        cfg["num_splits"] = 1  # tensor splitting only saves GPU memory; it breaks small inputs
    vae = AutoencoderKlMaisi(**cfg)
    for m in vae.modules() if optimized else ():
        if isinstance(m, MaisiGroupNorm3D):
            m.forward = types.MethodType(nn.GroupNorm.forward, m)  # type: ignore[method-assign]  # on purpose
    return vae


def build_unet(config: dict, device: torch.device, optimized: bool = True) -> DiffusionModelUNetMaisi:
    cfg = dict(config)
    cfg["use_flash_attention"] = bool(cfg.get("use_flash_attention")) and device.type == "cuda" and optimized
    return DiffusionModelUNetMaisi(**cfg)


def encoder_level_ends(num_res_blocks: list[int]) -> list[int]:
    """Indices in ``encoder.blocks`` of each level's last residual block.

    The block list is: conv, then per level its residual blocks and (but the last) a
    downsampler, then norm and conv (see docs/research/maisi.md).
    """
    ends, idx = [], 0
    for level, n in enumerate(num_res_blocks):
        idx += n
        ends.append(idx)
        if level < len(num_res_blocks) - 1:
            idx += 1
    return ends


class RFlowSampler(Sampler):
    """Rectified flow (MAISI v2): x_t = (1 - t/T) x0 + (t/T) noise, velocity prediction."""

    def __init__(self, args: dict, latent_numel: int):
        self.s = RFlowScheduler(**args)
        self.num_train_timesteps = self.s.num_train_timesteps
        self.latent_numel = latent_numel

    def timesteps(self, strength: float, steps: int) -> list[float]:
        t0 = strength * self.num_train_timesteps
        self.s.set_timesteps(
            grid_size(self.num_train_timesteps, strength, steps), input_img_size_numel=self.latent_numel
        )
        later = [float(t) for t in self.s.timesteps if float(t) < t0 - 1e-3]
        return [t0] + later[: steps - 1]

    def add_noise(self, z0, noise, t):
        return self.s.add_noise(z0, noise, torch.full((z0.shape[0],), t, device=z0.device))

    def step(self, model_out, t, t_next, z_t):
        # The Euler step of RFlowScheduler.step, written out because MONAI truncates the
        # next timestep to an integer, a small error with MAISI's shifted (fractional) steps.
        return z_t + model_out * (float(t) - float(t_next)) / self.num_train_timesteps


class DDIMSampler(ScheduleSampler):
    """DDIM over the betas a DDPM model (MAISI v1) was trained with: deterministic, few steps."""

    def __init__(self, args: dict):
        args = {k: v for k, v in args.items() if k not in ("variance_type",)}
        self.s = DDIMScheduler(**{**args, "clip_sample": False})
        self.num_train_timesteps = self.s.num_train_timesteps


class MaisiBackbone(Backbone):
    family = "maisi"
    features_lead_with_encoder = True  # both run _encode_with_levels under the same autocast

    def __init__(
        self,
        config: dict,
        scale_factor: float = 1.0,
        device: str | torch.device = "cpu",
        feature_noise: float = DEFAULT_FEATURE_NOISE,
        optimized: bool = True,
        cuda_graphs: bool = True,
    ):
        super().__init__()
        self.device = torch.device(device)
        self.config = config
        # optimized=False is the plain fp32 path (MONAI's loop GroupNorm, no flash attention,
        # no autocast): the baseline of benchmarks/gpu_stages.py, and a reference for numerics.
        self.optimized = optimized
        self.vae = build_vae(config["vae"], self.device, optimized)
        self.unet = build_unet(config["unet"], self.device, optimized)
        self.scale_factor = float(scale_factor)
        self.feature_noise = float(feature_noise)
        self.conditioning = config.get("conditioning", {})
        self.latent_stride = 2 ** (len(config["vae"]["num_channels"]) - 1)
        self._enc_ends = encoder_level_ends(list(config["vae"]["num_res_blocks"]))
        unet_levels = len(config["unet"]["num_channels"])
        # up_blocks[i] returns latent stride 2^(L-2-i) (the last one keeps stride 1).
        self._up_strides = [2 ** max(unet_levels - 2 - i, 0) for i in range(unet_levels)]
        self._up_used = [i for i, s in enumerate(self._up_strides) if s * self.latent_stride <= 8]
        # The denoiser's conditioning inputs for the current (batch, spacing, device): _conditioning()
        self._conditioning_key: tuple | None = None
        self._conditioning_names: tuple[str, ...] = ()
        self._conditioning_values: tuple[torch.Tensor, ...] = ()
        # Synthesis replays the denoiser from a CUDA graph (diffugts.networks.backbones.cuda_graphs):
        # its calls on a small latent crop are bound by kernel launches.
        self.graphed = GraphedCall() if optimized and cuda_graphs and self.device.type == "cuda" else None
        self.requires_grad_(False)
        self.eval()
        self.to(self.device)

    # --- loading --------------------------------------------------------------------------
    def load_weights(self, vae_state: dict, unet_state: dict, where: str = "model") -> None:
        for name, net, state in (("vae", self.vae, vae_state), ("unet", self.unet, unet_state)):
            load_strict(net, state, f"{where}: {name}")

    # --- features ---------------------------------------------------------------------------
    def feature_specs(self) -> list[FeatureSpec]:
        enc = [FeatureSpec(f"encoder{i}", c, 2**i) for i, c in enumerate(self.config["vae"]["num_channels"])]
        chans = list(reversed(self.config["unet"]["num_channels"]))
        dec = [FeatureSpec(f"denoiser{i}", chans[i], self._up_strides[i] * self.latent_stride) for i in self._up_used]
        return enc + dec

    def _encode_with_levels(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        levels = []
        hooks = [
            self.vae.encoder.blocks[i].register_forward_hook(lambda m, a, out: levels.append(out))
            for i in self._enc_ends
        ]
        try:
            h = self.vae.encoder(x)
        finally:
            for hook in hooks:
                hook.remove()
        z_mu = self.vae.quant_conv_mu(h)
        return levels, z_mu * self.scale_factor

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        with self._autocast():
            levels, _ = self._encode_with_levels(x)
        return [f.float() for f in levels]

    def features(self, x, spacing, generator=None):
        with self._autocast():
            levels, z = self._encode_with_levels(x)
            sampler = self.sampler(z.shape[2:])
            t = self.feature_noise * sampler.num_train_timesteps
            if generator is None:  # deterministic by default
                generator = torch.Generator(device=z.device).manual_seed(0)
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z_t = sampler.add_noise(z, noise, t)
            ups = []
            hooks = [
                self.unet.up_blocks[i].register_forward_hook(lambda m, a, out: ups.append(out)) for i in self._up_used
            ]
            try:
                self._denoise(z_t, t, spacing, self._unet_call)  # eager: a graph replay runs no hooks
            finally:
                for hook in hooks:
                    hook.remove()
        return [f.float() for f in levels + ups]

    # --- latent diffusion -------------------------------------------------------------------
    def encode(self, x):
        with self._autocast():
            return self._encode_with_levels(x)[1].float()

    def decode(self, z):
        with self._autocast():
            return self.vae.decode(z / self.scale_factor).float()

    def sampler(self, latent_shape) -> Sampler:
        sched = self.config["scheduler"]
        if sched["class"] == "RFlowScheduler":
            return RFlowSampler(sched["args"], int(math.prod(latent_shape)))
        if sched["class"] in ("DDPMScheduler", "DDIMScheduler"):
            return DDIMSampler(sched["args"])
        raise ConfigError(f"unsupported scheduler {sched['class']!r}")

    def denoise(self, z_t, t, spacing):
        if self.graphed is None:
            return self._denoise(z_t, t, spacing, self._unet_call)
        return self._denoise(z_t, t, spacing, lambda *inputs: self.graphed(self._unet_call, *inputs))

    def end_denoising(self) -> None:
        if self.graphed is not None:
            self.graphed.reset()

    def _denoise(self, z_t, t, spacing, call):
        timesteps = torch.full((z_t.shape[0],), float(t), device=z_t.device)
        return call(z_t, timesteps, *self._conditioning(z_t.shape[0], spacing, z_t.device))

    def _unet_call(self, z_t, timesteps, *conditioning):
        with self._autocast():
            return self.unet(z_t, timesteps, **dict(zip(self._conditioning_names, conditioning))).float()

    def _conditioning(self, n: int, spacing, device) -> tuple[torch.Tensor, ...]:
        """The denoiser's conditioning inputs (keywords: ``_conditioning_names``), made once per
        (batch, spacing): building them per call copied host memory to the GPU, a
        synchronisation before every call."""
        key = (n, tuple(float(v) for v in spacing), str(device))
        if key != self._conditioning_key:
            unet, region = self.config["unet"], self.conditioning.get("body_region")
            kwargs = {}
            if unet.get("include_spacing_input"):
                kwargs["spacing_tensor"] = torch.tensor([list(key[1])] * n, dtype=torch.float32) * 100
            if unet.get("num_class_embeds"):
                label = self.conditioning.get("class_label") or 1
                kwargs["class_labels"] = torch.full((n,), int(label), dtype=torch.long)
            if unet.get("include_top_region_index_input"):
                kwargs["top_region_index_tensor"] = torch.tensor([region[0]] * n).float() * 100
            if unet.get("include_bottom_region_index_input"):
                kwargs["bottom_region_index_tensor"] = torch.tensor([region[1]] * n).float() * 100
            self._conditioning_key, self._conditioning_names = key, tuple(kwargs)
            self._conditioning_values = tuple(v.to(device) for v in kwargs.values())
        return self._conditioning_values

    def _autocast(self):
        if self.device.type == "cuda" and self.optimized:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)
