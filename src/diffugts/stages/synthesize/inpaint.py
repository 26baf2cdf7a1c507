"""Latent inpainting with a frozen backbone: RePaint / blended latent diffusion.

Given the image crop ``x`` and a latent mask ``m`` (1 = regenerate), with z0 = E(x) and one
noise draw ``eps``:

    z = add_noise(z0, eps, t_0)                               # t_0 = strength * T
    for each step t -> t_next (repeated 1 + jumps times):
        z' = step(denoise(z, t), t, t_next, z)
        z' = m * z' + (1 - m) * add_noise(z0, eps, t_next)    # known latent, same noise draw
        if a jump is left: z = m * renoise(z', t_next -> t) + (1 - m) * add_noise(z0, eps, t)
    H = D(z)

``renoise`` is the forward transition q(z_t | z_t_next) of the sampler's Gaussian path,
derived from ``add_noise`` alone (it is linear: a(t) z0 + b(t) eps), so it holds for DDPM /
DDIM and rectified flow alike. Large crops run in overlapping latent tiles: the encoder, the
denoiser at every step and the decoder each see one tile at a time and the results are
blended with MONAI's Gaussian importance map, while the sampler's update and the known-region
blend act on the whole latent, so the tiles stay in step.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from types import EllipsisType

import torch
from monai.data.utils import compute_importance_map

from diffugts.networks.backbones import Backbone
from diffugts.utils.progress import progress


@dataclass(frozen=True)
class Tiles:
    """Overlapping windows over a latent grid (latent voxels); one window = no tiling."""

    windows: list[tuple[slice, ...]]  # one slice per latent axis
    size: tuple[int, ...]

    @classmethod
    def plan(cls, shape, tile, overlap: float) -> Tiles:
        size = tuple(min(t, n) for t, n in zip(tile, shape)) if tile else tuple(shape)
        starts = []
        for n, t in zip(shape, size):
            step = max(int(t * (1 - overlap)), 1)
            axis = list(range(0, n - t, step)) + [n - t]
            starts.append(axis)
        windows = [tuple(slice(s, s + t) for s, t in zip(corner, size)) for corner in itertools.product(*starts)]
        return cls(windows, size)

    @property
    def tiled(self) -> bool:
        return len(self.windows) > 1

    def apply(self, fn, inp: torch.Tensor, scale_in: int = 1, scale_out: int = 1) -> torch.Tensor:
        """``fn`` over every window of ``inp`` (window slices times ``scale_in``), blended into
        an output whose grid is the latent grid times ``scale_out``."""
        if not self.tiled:
            return fn(inp)
        weight_map = compute_importance_map(
            tuple(t * scale_out for t in self.size), mode="gaussian", device=inp.device
        )[None, None]
        out: torch.Tensor | None = None
        norm: torch.Tensor | None = None
        for win in self.windows:
            src: tuple[EllipsisType | slice, ...] = (..., *(slice(s.start * scale_in, s.stop * scale_in) for s in win))
            dst: tuple[EllipsisType | slice, ...] = (
                ...,
                *(slice(s.start * scale_out, s.stop * scale_out) for s in win),
            )
            piece = fn(inp[src])
            if out is None or norm is None:
                shape = (*piece.shape[:2], *(n // scale_in * scale_out for n in inp.shape[2:]))
                out = torch.zeros(shape, device=piece.device, dtype=piece.dtype)
                norm = torch.zeros((1, 1, *shape[2:]), device=piece.device, dtype=piece.dtype)
            out[dst] += piece * weight_map
            norm[dst] += weight_map
        assert out is not None and norm is not None  # one window at least
        return out / norm


def _path_coefficients(sampler, t: float, like: torch.Tensor) -> tuple[float, float]:
    """(a, b) with add_noise(z0, eps, t) = a z0 + b eps."""
    if t <= 0:
        return 1.0, 0.0
    one, zero = torch.ones((1,) * like.dim(), device=like.device), torch.zeros((1,) * like.dim(), device=like.device)
    return float(sampler.add_noise(one, zero, t)), float(sampler.add_noise(zero, one, t))


def renoise(sampler, z: torch.Tensor, t_from: float, t_to: float, generator: torch.Generator) -> torch.Tensor:
    """A sample of q(z_{t_to} | z_{t_from}) for t_to > t_from (a RePaint jump back)."""
    a_from, b_from = _path_coefficients(sampler, t_from, z)
    a_to, b_to = _path_coefficients(sampler, t_to, z)
    ratio = a_to / a_from
    sigma = max(b_to**2 - (ratio * b_from) ** 2, 0.0) ** 0.5
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    return ratio * z + sigma * eps


def _now(t: torch.Tensor) -> float:
    """Wall clock once the work that produced ``t`` is done (CUDA runs asynchronously)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


@torch.no_grad()
def inpaint(
    backbone: Backbone,
    x: torch.Tensor,
    mask: torch.Tensor,
    spacing,
    *,
    strength: float,
    steps: int,
    jumps: int,
    seed: int,
    tile: tuple[int, int, int] | None = None,
    overlap: float = 0.5,
    show_progress: bool = True,
    stats: dict | None = None,
) -> torch.Tensor:
    """Regenerate ``x`` (1, 1, K, J, I) where the latent ``mask`` (1, 1, K/s, J/s, I/s) is set.

    ``tile`` is the tile size in latent voxels (None: the whole crop at once). Noise comes from
    a CPU generator seeded with ``seed``, so a seed gives the same draw on any device.
    Returns the decoded crop on the model's [0, 1] scale (not clipped); ``stats`` (a dict)
    receives timings, the tile count and the timesteps.
    """
    stride = backbone.latent_stride
    if tuple(x.shape[2:]) != tuple(n * stride for n in mask.shape[2:]):
        raise ValueError(f"image {tuple(x.shape)} is not the latent mask {tuple(mask.shape)} times {stride}")
    tiles = Tiles.plan(tuple(mask.shape[2:]), tile, overlap)
    clock = time.perf_counter()
    z0 = tiles.apply(backbone.encode, x, scale_in=stride)
    t_encoded = _now(z0)
    m = mask.to(z0.dtype)
    sampler = backbone.sampler(tuple(z0.shape[2:]))
    generator = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
    ts = sampler.timesteps(strength, steps)

    def known(t: float) -> torch.Tensor:
        return z0 if t <= 0 else sampler.add_noise(z0, eps, t)

    z = known(ts[0])
    try:
        for n in progress(range(len(ts)), desc="denoise", unit="step", enable=show_progress):
            t = ts[n]
            t_next = ts[n + 1] if n + 1 < len(ts) else 0.0
            for r in range(jumps + 1):
                out = tiles.apply(lambda zt, t=t: backbone.denoise(zt, t, spacing), z)
                z_next = m * sampler.step(out, t, t_next, z) + (1 - m) * known(t_next)
                if r < jumps:
                    z = m * renoise(sampler, z_next, t_next, t, generator) + (1 - m) * known(t)
                else:
                    z = z_next
    finally:
        backbone.end_denoising()  # e.g. a CUDA graph's memory, before decoding needs it
    t_denoised = _now(z)
    image = tiles.apply(backbone.decode, z, scale_out=stride)
    if stats is not None:
        stats.update(
            encode_s=t_encoded - clock,
            denoise_s=t_denoised - t_encoded,
            decode_s=_now(image) - t_denoised,
            tiles=len(tiles.windows),
            denoiser_calls=len(ts) * (jumps + 1) * len(tiles.windows),
            timesteps=ts,
        )
    return image
