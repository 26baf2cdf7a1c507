"""What the stages need from a frozen latent diffusion backbone.

A backbone family (3D MAISI today; 2D diffusers latent diffusion later) implements this
interface over *volumes* shaped (B, 1, K, J, I) and normalised to [0, 1]; a 2D family
processes them slice by slice behind the same methods, so the stages never change:

- attention maps use :meth:`features` (multi-scale encoder + denoiser features);
- pseudo-healthy synthesis uses :meth:`encode`, :meth:`decode`, :meth:`sampler` and
  :meth:`denoise` to inpaint in latent space;
- residual refinement uses :meth:`encoder_features` of the image and of its pseudo-healthy
  counterpart.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    """One feature map of :meth:`Backbone.features`: channels and stride w.r.t. the image."""

    name: str
    channels: int
    stride: int


class Sampler(ABC):
    """Noise / denoise schedule over latents, whatever the scheduler family."""

    num_train_timesteps: int

    @abstractmethod
    def timesteps(self, strength: float, steps: int) -> list[float]:
        """Descending timesteps from ``strength * T`` to the last one before 0, ``steps`` long."""

    @abstractmethod
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """The latent ``z0`` noised to timestep ``t``."""

    @abstractmethod
    def step(self, model_out: torch.Tensor, t: float, t_next: float, z_t: torch.Tensor) -> torch.Tensor:
        """One denoising step from ``t`` to ``t_next`` (0 for the last step)."""


def grid_size(num_train_timesteps: int, strength: float, steps: int) -> int:
    """Timesteps of the scheduler grid of which the last ``steps`` start near ``strength * T``
    (as diffusers' img2img pipelines: ceil(steps / strength), at most T)."""
    return min(num_train_timesteps, max(steps, math.ceil(steps / max(strength, 1e-3))))


class ScheduleSampler(Sampler):
    """A :class:`Sampler` over a DDIM-style scheduler ``self.s`` (MONAI's or diffusers': both
    have ``set_timesteps``, ``timesteps``, ``add_noise`` and a ``step`` whose first item is the
    previous sample). Subclasses build ``self.s`` and set ``num_train_timesteps``."""

    s: Any  # the scheduler: MONAI's or diffusers', used through the methods above

    def timesteps(self, strength: float, steps: int) -> list[float]:
        self.s.set_timesteps(grid_size(self.num_train_timesteps, strength, steps))
        return [float(t) for t in self.s.timesteps if t <= strength * self.num_train_timesteps][:steps]

    def add_noise(self, z0, noise, t):
        return self.s.add_noise(z0, noise, torch.full((z0.shape[0],), int(t), dtype=torch.long, device=z0.device))

    def step(self, model_out, t, t_next, z_t):
        return self.s.step(model_out, int(t), z_t)[0]


class Backbone(nn.Module, ABC):
    """A frozen latent diffusion model: VAE (encoder E, decoder D) and a denoiser."""

    family: str
    latent_stride: int  # image voxels per latent voxel along each axis
    # True where features(x)'s leading encoder levels are exactly encoder_features(x) (same
    # computation): refinement then reuses the attention stage's instead of encoding x again.
    features_lead_with_encoder: bool = False
    # Set by every family's constructor (declared for the code that uses any backbone).
    config: dict  # the package's ``backbone`` section
    scale_factor: float  # latent scaling for the denoiser
    vae: Any  # the family's own modules (MONAI's or diffusers'), used through their own API
    unet: Any

    @abstractmethod
    def feature_specs(self) -> list[FeatureSpec]:
        """The maps :meth:`features` returns, in that order."""

    @property
    def resample_device(self) -> torch.device | None:
        """Where study <-> model grid resampling runs (:func:`diffugts.stages.preprocess.resample_array`):
        this backbone's CUDA device, or None (SimpleITK on the host) on the CPU and for the
        unoptimised fp32 baseline of the GPU benchmark."""
        device = getattr(self, "device", None)
        if device is not None and torch.device(device).type == "cuda" and getattr(self, "optimized", True):
            return torch.device(device)
        return None

    def feature_index(self, names: list[str]) -> list[int]:
        """Positions of the named maps in :meth:`features` (a head stores the names it uses)."""
        specs = [s.name for s in self.feature_specs()]
        missing = [n for n in names if n not in specs]
        if missing:
            from diffugts.errors import ConfigError

            raise ConfigError(f"backbone has no feature map {missing[0]!r} (has: {', '.join(specs)})")
        return [specs.index(n) for n in names]

    @abstractmethod
    def features(self, x: torch.Tensor, spacing, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Multi-scale features of ``x``: encoder levels, then denoiser decoder levels at a
        small noise level (fixed by the model package)."""

    @abstractmethod
    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps of ``x`` at each level (finest first)."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (the posterior mean, scaled for the denoiser)."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image from a (scaled) latent."""

    @abstractmethod
    def sampler(self, latent_shape) -> Sampler:
        """A sampler for latents of this spatial shape."""

    @abstractmethod
    def denoise(self, z_t: torch.Tensor, t: float, spacing) -> torch.Tensor:
        """The denoiser's output at timestep ``t`` (what :meth:`Sampler.step` consumes)."""

    def load_weights(self, vae_state: dict, unet_state: dict, where: str = "model") -> None:
        """Load the VAE and denoiser weights strictly (``where`` names the source in errors)."""
        raise NotImplementedError

    def end_denoising(self) -> None:
        """One inpainting's denoiser calls are done: drop what was kept for them (a CUDA graph)."""
