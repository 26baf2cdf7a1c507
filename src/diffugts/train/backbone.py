"""Training the demo backbone: the VAE, then the denoiser on latents of healthy anatomy.

This is the project's own recipe for a *small* MAISI-architecture model on the phantom
world (production uses the official frozen weights). The VAE learns to reconstruct CT
(healthy and seen-lesion cases); the rectified-flow denoiser only ever sees latents of
healthy cases, so inpainting with it produces healthy tissue.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from diffugts.networks.backbones.maisi import MaisiBackbone
from diffugts.utils.progress import progress

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    """What backbone training (3D here, 2D in :mod:`diffugts.train.backbone2d`) reports into
    the package's provenance."""

    vae_curve: list[float]
    unet_curve: list[float]
    vae_seconds: float
    denoiser_seconds: float
    details: dict
    curves: dict[str, list[float]] = field(default_factory=dict)  # parts of the denoiser's loss


def fit_backbone_3d(
    backbone: MaisiBackbone, cases, vae_steps: int, denoiser_steps: int, seed: int, spacing, show_progress: bool = True
) -> Fitted:
    """The VAE on every case, then the denoiser on the healthy ones."""
    t0 = time.perf_counter()
    vae_curve = train_vae(backbone, [c.x for c in cases], vae_steps, seed, show_progress=show_progress)
    t1 = time.perf_counter()
    healthy = [c.x for c in cases if not c.records]
    unet_curve = train_denoiser(backbone, healthy, denoiser_steps, seed, spacing=spacing, show_progress=show_progress)
    return Fitted(
        vae_curve, unet_curve, t1 - t0, time.perf_counter() - t1, {"denoiser_data": "healthy CT phantoms only"}
    )


def random_crops(
    arrays: list[np.ndarray], crop: tuple[int, int, int], batch: int, rng: np.random.Generator
) -> np.ndarray:
    out = np.empty((batch, 1, *crop), dtype=np.float32)
    for b in range(batch):
        a = arrays[rng.integers(len(arrays))]
        starts = [rng.integers(0, max(s - c, 0) + 1) for s, c in zip(a.shape[-3:], crop)]
        sl = tuple(slice(st, st + c) for st, c in zip(starts, crop))
        out[b, 0] = a[(...,) + sl] if a.ndim == 3 else a[(0,) + sl]
    return out


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(
    backbone: MaisiBackbone,
    images: list[np.ndarray],
    steps: int,
    seed: int,
    crop=(32, 48, 48),
    batch: int = 4,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    show_progress: bool = True,
) -> list[float]:
    """L1 reconstruction + a small KL term on random crops; returns the loss curve."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vae = backbone.vae
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    losses: list[float] = []
    bar = progress(range(steps), desc="train VAE", unit="step", enable=show_progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        x = torch.from_numpy(random_crops(images, crop, batch, rng)).to(backbone.device)
        recon, mu, sigma = vae(x)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).mean()
        loss = F.l1_loss(recon, x) + kl_weight * kl
        _update(opt, loss, vae, losses, bar, step)
    vae.requires_grad_(False).eval()
    return losses


@torch.no_grad()
def latents(backbone: MaisiBackbone, images: list[np.ndarray]) -> list[torch.Tensor]:
    """Posterior means of whole volumes, before the scale factor."""
    saved, backbone.scale_factor = backbone.scale_factor, 1.0
    try:
        return [backbone.encode(torch.from_numpy(a)[None, None].to(backbone.device))[0].cpu() for a in images]
    finally:
        backbone.scale_factor = saved


def train_denoiser(
    backbone: MaisiBackbone,
    healthy: list[np.ndarray],
    steps: int,
    seed: int,
    crop=(8, 16, 16),
    batch: int = 8,
    lr: float = 5e-4,
    spacing=(1.0, 1.0, 1.0),
    show_progress: bool = True,
) -> list[float]:
    """Rectified flow on latents of healthy volumes; sets the backbone's scale factor
    (1 / std of the latents, as MAISI computes it)."""
    zs = latents(backbone, healthy)
    backbone.scale_factor = float(1.0 / torch.cat([z.flatten() for z in zs]).std())
    arrays = [(z * backbone.scale_factor).numpy() for z in zs]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    unet = backbone.unet
    unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    sampler = backbone.sampler(crop)
    T = sampler.num_train_timesteps
    losses: list[float] = []
    bar = progress(range(steps), desc="train denoiser", unit="step", enable=show_progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        z0 = torch.from_numpy(_latent_crops(arrays, crop, batch, rng)).to(backbone.device)
        noise = torch.randn_like(z0)
        t = torch.rand(batch, device=z0.device) * T
        z_t = torch.stack([sampler.add_noise(z0[b : b + 1], noise[b : b + 1], float(t[b]))[0] for b in range(batch)])
        v = _denoise_batch(backbone, z_t, t, spacing)
        loss = F.mse_loss(v, z0 - noise)  # velocity target of rectified flow
        _update(opt, loss, unet, losses, bar, step)
    unet.requires_grad_(False).eval()
    return losses


def _update(opt, loss, net, losses: list[float], bar, step: int) -> None:
    """One clipped optimiser step; the loss joins the curve and the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    losses.append(loss.item())
    if hasattr(bar, "set_postfix") and step % 10 == 0:
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")


def _latent_crops(arrays, crop, batch, rng) -> np.ndarray:
    c = arrays[0].shape[0]
    out = np.empty((batch, c, *crop), dtype=np.float32)
    for b in range(batch):
        a = arrays[rng.integers(len(arrays))]
        starts = [rng.integers(0, max(s - k, 0) + 1) for s, k in zip(a.shape[1:], crop)]
        out[b] = a[(slice(None),) + tuple(slice(st, st + k) for st, k in zip(starts, crop))]
    return out


def _denoise_batch(backbone: MaisiBackbone, z_t: torch.Tensor, t: torch.Tensor, spacing) -> torch.Tensor:
    """The denoiser on a batch with one timestep per sample (training)."""
    kwargs = {}
    if backbone.config["unet"].get("include_spacing_input"):
        kwargs["spacing_tensor"] = torch.tensor([list(spacing)] * z_t.shape[0], device=z_t.device) * 100
    return backbone.unet(z_t, t, **kwargs)
