"""Training the 2D demo backbone (the diffusers family, docs/backbones-2d.md), slice by slice.

The same two parts as the 3D recipe (:mod:`diffugts.train.backbone`), on axial slices of the
model-grid volumes:

1. The ``AutoencoderKL`` learns to reconstruct slices of every case (healthy and seen-lesion
   CT): L1 on random in-plane crops plus a small KL term. Crops, because the VAE is
   convolutional and a quarter of a slice costs a quarter of the time.
2. The latent scale factor becomes 1 / std of the latents of the healthy slices (as the 3D
   recipe and Stable Diffusion compute it); the 2D backbone reads it from the VAE's
   ``scaling_factor``, so it is written there.
3. The ``UNet2DConditionModel`` learns the configuration's DDPM objective (epsilon, or v if
   the scheduler says so) on latents of *healthy* slices only: every slice of a healthy case,
   and slices of lesion cases at least :data:`LESION_MARGIN` slices away from any lesion.
   Inpainting with it therefore regenerates healthy tissue.

Text conditioning: each training crop's caption names the organs it shows ("CT slice with
liver, spleen, right kidney", from the organ label map), encoded by the backbone's own text
path (:meth:`~diffugts.networks.backbones.diffusers2d.Diffusers2DBackbone._context`: the MiniLM token
states, exactly as at inference). The denoising loss alone barely teaches the cross-attention
where an organ is, so a token-grounding term makes the attention of an organ's words learn
that organ's mask (:func:`train_unet_2d`). With probability :data:`UNCONDITIONAL` a caption is
replaced by the package's conditioning prompt (default ``""``): features and inpainting run
the UNet with that prompt, so it must be a trained input too (classifier-free-guidance style
caption dropout).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffugts.networks.backbones.diffusers2d import Diffusers2DBackbone
from diffugts.networks.backbones.diffusers_samplers import scheduler_args
from diffugts.train.backbone import Fitted, _update, cosine_lr
from diffugts.train.data import TrainingCase
from diffugts.utils.progress import progress

# A slice this close to a lesion may still show its rim or mass effect: not "healthy".
LESION_MARGIN = 2
# An organ is named in a slice's caption when it covers at least this fraction of the slice:
# a few stray pixels at an organ's tip are not something the model can attend to.
ORGAN_MIN_FRACTION = 0.005
# The body outline is in every slice: naming it teaches the cross-attention nothing.
CAPTION_SKIP = ("body",)
UNCONDITIONAL = 0.2  # caption dropout (see the module docstring)
# Token grounding (see train_unet_2d): its weight beside the denoising loss, and the noise
# levels it applies to (maps are read at t <= 0.5 T; near T the latent shows no organ).
GROUNDING_WEIGHT = 0.5
GROUNDING_MAX_NOISE = 0.6


def caption_organs(organs: np.ndarray, names: dict[int, str]) -> list[tuple[int, str]]:
    """(label, name) of the organs a label map shows, in label order (a fixed order keeps
    captions of neighbouring slices alike)."""
    labels, counts = np.unique(organs, return_counts=True)
    return [
        (int(lab), names[int(lab)])
        for lab, n in zip(labels, counts)
        if lab and int(lab) in names and n >= ORGAN_MIN_FRACTION * organs.size and names[int(lab)] not in CAPTION_SKIP
    ]


def caption(organs: np.ndarray, names: dict[int, str], modality: str = "CT") -> str:
    """ "CT slice with liver, spleen, right kidney": the organs of one slice's label map."""
    present = [name for _, name in caption_organs(organs, names)]
    return f"{modality} slice with {', '.join(present)}" if present else f"{modality} slice"


def healthy_slices(case: TrainingCase, margin: int = LESION_MARGIN) -> np.ndarray:
    """Indices of the slices with no lesion within ``margin`` slices."""
    k = case.x.shape[0]
    touched = np.flatnonzero(case.lesions.reshape(k, -1).any(1))
    near = np.zeros(k, bool)
    for s in touched:
        near[max(s - margin, 0) : s + margin + 1] = True
    return np.flatnonzero(~near)


@dataclass
class SliceSet:
    """VAE inputs and organ maps of whole cases, and which of their slices to draw from."""

    inputs: list[torch.Tensor]  # per case (K, C, J, I) on [-1, 1], as the backbone feeds its VAE
    organs: list[np.ndarray]  # per case (K, J, I) organ labels
    names: list[dict[int, str]]  # per case: label -> organ name
    modality: list[str]
    index: list[tuple[int, int]]  # (case, slice)

    def caption(self, n: int, box: tuple[slice, slice] = (slice(None), slice(None))) -> str:
        """The caption of entry ``n`` of the index, of the whole slice or the in-plane box."""
        case, k = self.index[n]
        return caption(self.organs[case][k][box], self.names[case], self.modality[case])

    def grounding(self, n: int, box: tuple[slice, slice]) -> tuple[str, list[tuple[str, np.ndarray]]]:
        """The caption of the box and, per organ it names, the organ's mask in the box."""
        case, k = self.index[n]
        organs = self.organs[case][k][box]
        return (
            caption(organs, self.names[case], self.modality[case]),
            [(name, organs == label) for label, name in caption_organs(organs, self.names[case])],
        )


def slice_set(backbone: Diffusers2DBackbone, cases: list[TrainingCase], healthy_only: bool) -> SliceSet:
    # The backbone's own slicing (range, context slices / repeated channels): training sees
    # exactly the inputs inference will.
    inputs = [backbone._slices(torch.from_numpy(c.x)[None, None]).contiguous() for c in cases]
    index = [
        (n, int(k)) for n, c in enumerate(cases) for k in (healthy_slices(c) if healthy_only else range(c.x.shape[0]))
    ]
    return SliceSet(
        inputs, [c.organs for c in cases], [c.organ_names for c in cases], [c.modality for c in cases], index
    )


def _crops(slices: SliceSet, crop: int, batch: int, rng: np.random.Generator) -> torch.Tensor:
    out = []
    for _ in range(batch):
        n, k = slices.index[rng.integers(len(slices.index))]
        img = slices.inputs[n][k]
        cj, ci = min(crop, img.shape[1]), min(crop, img.shape[2])
        j0, i0 = rng.integers(0, img.shape[1] - cj + 1), rng.integers(0, img.shape[2] - ci + 1)
        out.append(img[:, j0 : j0 + cj, i0 : i0 + ci])
    return torch.stack(out)


def train_vae_2d(
    backbone: Diffusers2DBackbone,
    slices: SliceSet,
    steps: int,
    seed: int,
    crop: int = 64,
    batch: int = 8,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    show_progress: bool = True,
) -> list[float]:
    """L1 reconstruction of random slice crops + a small KL term; returns the loss curve."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vae = backbone.vae
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    out_channels = int(vae.config.out_channels)
    losses: list[float] = []
    bar = progress(range(steps), desc="train VAE (2D)", unit="step", enable=show_progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        x = _crops(slices, crop, batch, rng).to(backbone.device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        # A 2.5D VAE (context slices in, one slice out) reconstructs the centre channel.
        target = x if out_channels == x.shape[1] else x[:, [x.shape[1] // 2]]
        kl = 0.5 * (post.mean.pow(2) + post.var - post.logvar - 1).mean()  # per element, as the 3D recipe
        loss = F.l1_loss(recon, target) + kl_weight * kl
        _update(opt, loss, vae, losses, bar, step)
    vae.requires_grad_(False).eval()
    return losses


@torch.no_grad()
def slice_latents(backbone: Diffusers2DBackbone, slices: SliceSet) -> torch.Tensor:
    """Posterior means (N, C, h, w) of the set's slices, before the scale factor, in the
    order of ``slices.index`` (which :func:`slice_set` builds case by case)."""
    saved, backbone.scale_factor = backbone.scale_factor, 1.0
    try:
        out = []
        for n, inp in enumerate(slices.inputs):
            ks = [k for m, k in slices.index if m == n]
            for part in backbone._chunks(len(ks)):
                out.append(backbone._encode_slices(inp[ks[part]].to(backbone.device)).cpu())
        return torch.cat(out)
    finally:
        backbone.scale_factor = saved


def set_scale_factor(backbone: Diffusers2DBackbone, scale: float) -> None:
    """The latent scale, where the 2D backbone and a saved package read it."""
    backbone.scale_factor = float(scale)
    backbone.vae.register_to_config(scaling_factor=float(scale))
    backbone.config["vae"] = {**backbone.config["vae"], "scaling_factor": float(scale)}


def train_unet_2d(
    backbone: Diffusers2DBackbone,
    latents: torch.Tensor,
    slices: SliceSet,
    steps: int,
    seed: int,
    crop: int | None = 16,
    batch: int = 16,
    lr: float = 5e-4,
    unconditional: float = UNCONDITIONAL,
    grounding: float = GROUNDING_WEIGHT,
    show_progress: bool = True,
) -> dict[str, list[float]]:
    """The DDPM objective of the configuration's scheduler on scaled latents (N, C, h, w) of
    the set's slices, plus token grounding; returns the loss curves (``loss``: the total,
    ``denoise``, ``grounding``).

    Each sample is a ``crop`` x ``crop`` latent crop (None: the whole slice) captioned with the
    organs *inside the crop*: the UNet's cost is dominated by self-attention over the latent
    pixels (80 % of a forward pass at 32 x 32 latents, 2026-11 profile), which a 16 x 16 crop
    cuts 16-fold, and a caption must name only what the UNet can see. The layers have no
    positional embedding, so the full slices of inference are the same computation on more
    pixels.

    Token grounding (after TokenCompose, Wang et al., CVPR 2024): the denoising loss alone
    barely needs the caption, and after 450 steps the cross-attention of "liver" was the
    same inside and outside the liver (0.340 / 0.340, measured). So, for captioned samples
    at t <= GROUNDING_MAX_NOISE * T, the cross-attention mass A of each organ's words
    (heads and layers averaged, as :func:`~diffugts.networks.backbones.cross_attention.cross_attention_maps`
    reads it) learns the organ's mask M on the latent grid: (1 - sum(A M) / sum(A))^2 (the
    word attends inside its organ) + BCE(A, M) (per position). Only organ masks of healthy
    slices are used, never a lesion: the words "tumor" or "lesion" are never grounded.
    """
    from diffusers import DDPMScheduler

    from diffugts.networks.backbones.cross_attention import AttentionStore

    sched = DDPMScheduler.from_config(scheduler_args(backbone.config["scheduler"]))
    prediction = sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        from diffugts.errors import ConfigError

        raise ConfigError(f"cannot train a {prediction!r} denoiser (epsilon or v_prediction)")
    T = int(sched.config.num_train_timesteps)
    empty = (backbone.config.get("conditioning") or {}).get("prompt") or ""
    s = backbone.latent_stride
    words = WordTokens(backbone)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    unet = backbone.unet
    unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    curves: dict[str, list[float]] = {"loss": [], "denoise": [], "grounding": []}
    bar = progress(range(steps), desc="train denoiser (2D)", unit="step", enable=show_progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        t = torch.randint(0, T, (batch,), device=backbone.device)
        zs, texts, targets = [], [], []
        for b, n in enumerate(rng.integers(len(latents), size=batch)):
            h, w = latents.shape[2:]
            ch, cw = min(crop or h, h), min(crop or w, w)
            j0, i0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            zs.append(latents[n, :, j0 : j0 + ch, i0 : i0 + cw])
            text, masks = slices.grounding(int(n), (slice(j0 * s, (j0 + ch) * s), slice(i0 * s, (i0 + cw) * s)))
            if rng.random() < unconditional:
                text, masks = empty, []
            texts.append(text)
            if grounding and masks and t[b] <= GROUNDING_MAX_NOISE * T:
                targets += [(b, idx, _pool(m, s)) for idx, (_, m) in zip(words(text, [m[0] for m in masks]), masks)]
        z0 = torch.stack(zs).to(backbone.device)
        hidden, mask = backbone._context(texts, 1)  # the frozen text encoder: no gradient
        noise = torch.randn_like(z0)
        z_t = sched.add_noise(z0, noise, t)
        target = noise if prediction == "epsilon" else sched.get_velocity(z0, noise, t)
        store = AttentionStore((z0.shape[2], z0.shape[3]))
        with backbone._capture(store) if targets else contextlib.nullcontext():
            out = unet(z_t, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
        denoise = F.mse_loss(out, target)
        ground = _grounding_loss(store.mean(), targets) if targets else torch.zeros((), device=z0.device)
        _update(opt, denoise + grounding * ground, unet, curves["loss"], bar, step)
        curves["denoise"].append(denoise.item())
        curves["grounding"].append(ground.item())
    unet.requires_grad_(False).eval()
    return curves


def _pool(mask: np.ndarray, stride: int) -> torch.Tensor:
    """A pixel mask as the fraction of each latent pixel it covers."""
    return F.avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None], stride)[0]


def _grounding_loss(maps: torch.Tensor, targets) -> torch.Tensor:
    """maps (B, L, h, w); targets: (sample, token indices of an organ's words, its mask (h, w))."""
    terms = []
    for b, idx, m in targets:
        a = maps[b, idx].sum(0)
        m = m.to(a.device)
        inside = (a * m).sum() / a.sum().clamp_min(1e-6)
        terms.append((1 - inside) ** 2 + F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), m))
    return torch.stack(terms).mean()


class WordTokens:
    """Positions of words in a caption's token sequence, as the backbone tokenises it (each
    word tokenised alone and found in order: any tokenizer, no offset mapping needed)."""

    def __init__(self, backbone: Diffusers2DBackbone):
        self.tokenizer = backbone._text_encoder()[0]
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str, special: bool) -> list[int]:
        key = f"{int(special)}{text}"
        if key not in self.cache:
            self.cache[key] = self.tokenizer(text, add_special_tokens=special, truncation=True, max_length=512)[
                "input_ids"
            ]
        return self.cache[key]

    def __call__(self, text: str, words: list[str]) -> list[list[int]]:
        seq, out, start = self.ids(text, True), [], 0
        for word in words:
            piece = self.ids(word, False)
            at = next((i for i in range(start, len(seq) - len(piece) + 1) if seq[i : i + len(piece)] == piece), None)
            if at is None:
                raise ValueError(f"{word!r} not found in the tokens of {text!r}")
            out.append(list(range(at, at + len(piece))))
            start = at + len(piece)
        return out


def fit_backbone_2d(
    backbone: Diffusers2DBackbone,
    cases: list[TrainingCase],
    vae_steps: int,
    denoiser_steps: int,
    seed: int,
    show_progress: bool = True,
) -> Fitted:
    """VAE on every slice, scale factor, then the captioned denoiser on healthy slices."""
    t0 = time.perf_counter()
    every = slice_set(backbone, cases, healthy_only=False)
    vae_curve = train_vae_2d(backbone, every, vae_steps, seed, show_progress=show_progress)
    t1 = time.perf_counter()
    healthy = slice_set(backbone, cases, healthy_only=True)
    z = slice_latents(backbone, healthy)
    set_scale_factor(backbone, 1.0 / float(z.std()))
    curves = train_unet_2d(
        backbone, z * backbone.scale_factor, healthy, denoiser_steps, seed, show_progress=show_progress
    )
    t2 = time.perf_counter()
    return Fitted(
        vae_curve,
        curves["loss"],
        t1 - t0,
        t2 - t1,
        {
            "grounding_weight": GROUNDING_WEIGHT,
            "vae_slices": len(every.index),
            "denoiser_slices": len(healthy.index),
            "caption_example": healthy.caption(len(healthy.index) // 2),
            "denoiser_data": f"healthy CT slices only (no lesion within {LESION_MARGIN} slices), latent crops "
            f"captioned with the organs they show (token grounding on their organ masks); caption dropout "
            f"{UNCONDITIONAL}",
        },
        {"denoising": curves["denoise"], "grounding": curves["grounding"]},
    )
