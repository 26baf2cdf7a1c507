"""Cross-attention maps of a diffusers UNet: capture, aggregation, and the training-free
anomaly map built from them (docs/backbones-2d.md, "Cross-attention maps").

The capture is a diffusers attention processor installed with ``set_attn_processor`` on
the UNet's cross-attention layers (``attn2``); the backbone
(:class:`~diffugts.networks.backbones.diffusers2d.Diffusers2DBackbone`) runs the UNet, this module
says what is recorded and how it is averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffugts.errors import ConfigError

if TYPE_CHECKING:
    from diffugts.networks.backbones.diffusers2d import Diffusers2DBackbone

# Cross-attention maps are averaged over these fractions of the schedule (one noise draw):
# at t near 0 the UNet barely needs the text and its maps are flat; near T the latent is
# noise and the maps are blurred; a few low-to-middle noise levels is the usual compromise
# (DAAM averages over every step of a generation; prompt-to-prompt uses the middle steps).
DEFAULT_ATTENTION_NOISE = (0.1, 0.3, 0.5)


class AttentionStore:
    """Cross-attention probabilities of one UNet call, averaged over heads and layers.

    Each layer's map (B, L, h_l, w_l) is upsampled bilinearly to the latent grid (h, w) and
    all layers are weighted equally (the tiny and the large models alike have few
    cross-attention layers per resolution; coarse layers carry the semantics, fine ones the
    borders). Bilinear interpolation is a convex combination, so at every position the
    maps still sum to 1 over the attended tokens.
    """

    def __init__(self, latent_hw: tuple[int, int]):
        self.latent_hw = latent_hw
        self.total: torch.Tensor | None = None
        self.layers = 0

    def add(self, probs: torch.Tensor, batch: int) -> None:
        heads = probs.shape[0] // batch
        p = probs.float().view(batch, heads, *probs.shape[1:]).mean(1)  # (B, hw, L)
        h0, w0 = self.latent_hw
        f = round(math.sqrt(h0 * w0 / p.shape[1]))
        h, w = math.ceil(h0 / f), math.ceil(w0 / f)
        if h * w != p.shape[1]:
            raise RuntimeError(f"cannot place {p.shape[1]} attention positions on a {h0}x{w0} latent")
        m = p.transpose(1, 2).reshape(batch, p.shape[2], h, w)
        if (h, w) != (h0, w0):
            m = F.interpolate(m, size=(h0, w0), mode="bilinear", align_corners=False)
        self.total = m if self.total is None else self.total + m
        self.layers += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ConfigError("the UNet has no cross-attention layers: no cross-attention maps")
        return self.total / self.layers


class CaptureProcessor:
    """diffusers' plain ``AttnProcessor`` computation that also hands the softmax
    probabilities of a cross-attention layer to an :class:`AttentionStore`."""

    def __init__(self, store: AttentionStore):
        self.store = store

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        if encoder_hidden_states is not None:
            self.store.add(probs, batch)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass
class PromptTokens:
    """A tokenised prompt: its embedding sequence, which positions attend, which are words."""

    text: str
    tokens: list[str]  # every position of the sequence (special and padding tokens included)
    hidden: torch.Tensor  # (L, D) text encoder output
    attend: torch.Tensor  # (L,) bool: positions the UNet may attend to
    content: torch.Tensor  # (L,) bool: the prompt's own word pieces (no special or padding token)


@dataclass
class CrossAttentionMaps:
    """Per prompt, the attention its words receive at every voxel of the volume.

    ``maps[b, p]`` is the prompt's *attention mass*: the sum over its content tokens of the
    per-token maps, in [0, 1] (the rest goes to the special tokens). ``token_maps[p]``
    (B, L, K, J, I), when asked for, holds every token's map; over the attended tokens they
    sum to 1 at every voxel (a softmax, averaged and linearly upsampled).
    """

    prompts: list[str]
    tokens: list[list[str]]
    maps: torch.Tensor  # (B, P, K, J, I)
    token_maps: list[torch.Tensor] | None


@torch.no_grad()
def cross_attention_maps(
    backbone: Diffusers2DBackbone,
    x: torch.Tensor,
    prompts: list[str],
    noise: tuple[float, ...] | None = None,
    seed: int = 0,
    return_tokens: bool = False,
) -> CrossAttentionMaps:
    """Per prompt, its cross-attention maps over the volume ``x`` (B, 1, K, J, I).

    Aggregation (a decision, docs/backbones-2d.md): the softmax over tokens of every
    cross-attention layer, averaged over heads, each layer upsampled bilinearly to the latent
    grid and averaged over layers (:class:`AttentionStore`), then averaged over the timesteps
    ``noise`` (fractions of the schedule; default :data:`DEFAULT_ATTENTION_NOISE`, one noise
    draw from ``seed``), and finally upsampled bilinearly from the latent grid to the slice.
    Every prompt is its own UNet call (tokens of one prompt compete; prompts do not).
    """
    if not prompts:
        raise ConfigError("give at least one prompt")
    noise = tuple(noise or backbone.attention_noise)
    b, _, k, j, i = x.shape
    sl = backbone._slices(x)
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    toks = [backbone.tokens(p) for p in prompts]
    length = max(len(t.tokens) for t in toks)
    with backbone._autocast():
        _, noised = backbone._noised(sl, noise, gen)
        acc = None
        for t, z_t in noised:
            per_t = torch.cat(
                [backbone._attention(z_t[part], t, prompts).float() for part in backbone._chunks(sl.shape[0])]
            )  # (B*K, P, L, h, w)
            acc = per_t if acc is None else acc + per_t
    assert acc is not None  # at least one noise level
    latent = acc / len(noised)
    n_tok = latent.shape[2]
    up = F.interpolate(latent.flatten(1, 2), size=(j, i), mode="bilinear", align_corners=False)
    up = up.reshape(b, k, len(prompts), n_tok, j, i).permute(0, 2, 3, 1, 4, 5)  # (B, P, L, K, J, I)
    content = torch.stack([F.pad(t.content.float(), (0, length - len(t.tokens))) for t in toks]).to(up.device)
    maps = (up * content[None, :, :, None, None, None]).sum(2)
    token_maps = [up[:, p, : len(toks[p].tokens)] for p in range(len(prompts))] if return_tokens else None
    return CrossAttentionMaps(list(prompts), [t.tokens for t in toks], maps, token_maps)


@torch.no_grad()
def training_free_probability(
    backbone: Diffusers2DBackbone, x: torch.Tensor, target, noise=None, seed: int = 0
) -> torch.Tensor:
    """A training-free anomaly map (B, K, J, I) in [0, 1] for a :class:`~diffugts.networks.text.Target`.

    The attention mass of the target's abnormal prompts (mean over them) against that of its
    normal prompts: A_abn / (A_abn + A_norm), the anomaly-aware contrast of the AOVA head
    done on the native cross-attention maps with no trained weights. 0.5 where the model
    attends equally (or not at all) to both.
    """
    return training_free_probabilities(backbone, x, [target], noise=noise, seed=seed)[:, 0]


@torch.no_grad()
def training_free_probabilities(
    backbone: Diffusers2DBackbone, x: torch.Tensor, targets: list, noise=None, seed: int = 0
) -> torch.Tensor:
    """:func:`training_free_probability` of several targets (B, T, K, J, I): prompts that
    targets share (the generic normal ones) go through the UNet once."""
    prompts = list(dict.fromkeys(p for t in targets for p in t.normal + t.abnormal))
    maps = cross_attention_maps(backbone, x, prompts, noise=noise, seed=seed).maps
    out = []
    for t in targets:
        normal = maps[:, [prompts.index(p) for p in t.normal]].mean(1)
        abnormal = maps[:, [prompts.index(p) for p in t.abnormal]].mean(1)
        out.append((abnormal + 1e-6) / (abnormal + normal + 2e-6))
    return torch.stack(out, 1)
