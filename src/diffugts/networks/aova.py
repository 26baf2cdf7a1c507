"""Anomaly-aware open-vocabulary attention (AOVA) maps.

Frozen multi-scale backbone features are matched against text embeddings of a target's
prompts. Small trainable adapters map each scale's features, which are fused at the finest
feature resolution into voxel queries Q; a text projection maps prompt embeddings to keys
K. Attention logits QK^T / sqrt(d) are soft-maxed **over the prompts** of one target:

- the *region* map contrasts the target organ's prompts (its normal and abnormal ones)
  with generic normal tissue: where the named tissue is;
- the *anomaly* map contrasts, within that tissue, the abnormal prompts with the organ's
  normal prompts (the anomaly-aware contrast), from queries that also carry each voxel's
  deviation from the tissue's prototype query.

P(lesion) = P(region) x P(abnormal | region). An image-level anomaly score comes from the
top of the log-odds map.

Losses (decisions, see DESIGN.md): Dice + BCE on the lesion map and on the region map (the
organ's mask, every organ including those that never carry a lesion in training), a
contrastive alignment of pooled lesion features with the target's prompt embedding, and
BCE on the image-level score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AOVAOutput:
    prob: torch.Tensor  # (B, T, *spatial) P(lesion of the target) = P(target tissue) * P(abnormal | tissue)
    log_odds: torch.Tensor  # (B, T, *spatial) logit of prob
    region_log_odds: torch.Tensor  # (B, T, *spatial) target tissue (its organ) vs generic normal tissue
    anomaly_log_odds: torch.Tensor  # (B, T, *spatial) abnormal vs normal prompts of the target's organ
    score: torch.Tensor  # (B, T) image-level anomaly probability
    queries: list[torch.Tensor]  # (B, d, *spatial) fused voxel queries (a list for the loss API)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each voxel of a (B, C, *S) tensor."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


class AOVAHead(nn.Module):
    def __init__(
        self,
        feature_channels: list[int],
        text_dim: int = 384,
        dim: int = 64,
        top_fraction: float = 0.002,
        pool_finest: bool = False,
    ):
        super().__init__()
        self.config = {
            "feature_channels": list(feature_channels),
            "text_dim": text_dim,
            "dim": dim,
            "top_fraction": top_fraction,
            "pool_finest": pool_finest,
        }
        self.pool_finest = pool_finest
        self.dim = dim
        self.top_fraction = top_fraction
        # Per-scale adapters project each frozen feature map; the scales are then fused by
        # concatenation at the finest resolution, so the query of a voxel can compare its
        # fine appearance with the coarse context around it ("unlike the tissue around it"
        # is what abnormal means; a per-scale linear read-out of these features is at chance
        # level on held-out phantoms, a cross-scale one is not). Norms are per voxel over
        # channels: a map must not depend on the crop or tile it was computed in.
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Conv3d(c, dim, 1), ChannelNorm(dim), nn.GELU()) for c in feature_channels
        )
        self.fuse = nn.Sequential(
            nn.Conv3d(dim * len(feature_channels), dim, 1),
            ChannelNorm(dim),
            nn.GELU(),
            nn.Conv3d(dim, dim, 3, padding=1),
            ChannelNorm(dim),
            nn.GELU(),
            nn.Conv3d(dim, dim, 1),
        )
        # Anomaly-aware queries: each voxel's query next to its deviation from the target
        # tissue's prototype (the region-weighted mean query), so "abnormal" can mean
        # "unlike this organ" for organs and lesion types training never paired.
        self.deviation = nn.Sequential(
            nn.Conv3d(2 * dim, dim, 1),
            ChannelNorm(dim),
            nn.GELU(),
            nn.Conv3d(dim, dim, 1),
        )
        self.text_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.score_affine = nn.Parameter(torch.tensor([1.0, 0.0]))

    @classmethod
    def from_config(cls, config: dict) -> AOVAHead:
        return cls(**config)

    def work_shape(self, shapes) -> tuple[int, ...]:
        """Where the queries live: the finest feature grid, or with ``pool_finest`` the
        second finest (full-resolution maps are pooled down to it: fine intensity detail
        without paying for full-resolution queries)."""
        ordered = sorted({tuple(s) for s in shapes}, key=lambda s: -torch.Size(s).numel())
        return ordered[1] if len(ordered) > 1 and self.pool_finest else ordered[0]

    def forward(
        self,
        features: list[torch.Tensor],
        prompts: torch.Tensor,
        groups: list[tuple[list[int], ...]],
        out_shape: tuple[int, ...] | None = None,
    ) -> AOVAOutput:
        """features: per scale (B, C_s, *S_s); prompts: (P, text_dim) embeddings;
        groups: per target (generic normal, organ normal, abnormal) prompt indices."""
        work = self.work_shape([f.shape[2:] for f in features])
        adapted = []
        for adapter, feat in zip(self.adapters, features):
            a = adapter(feat)
            if tuple(a.shape[2:]) != work:
                bigger = torch.Size(a.shape[2:]).numel() > torch.Size(work).numel()
                a = (
                    F.adaptive_avg_pool3d(a, cast(tuple[int, int, int], work))
                    if bigger
                    else F.interpolate(a, size=work, mode="trilinear", align_corners=False)
                )
            adapted.append(a)
        q = self.fuse(torch.cat(adapted, 1))  # (B, d, *S): the voxel queries
        k = self.text_proj(prompts)  # (P, d): the prompt keys
        logits = torch.einsum("bd...,pd->bp...", q, k) / self.dim**0.5  # (B, P, *S)
        regions, anomalies = [], []
        for generic, organ, abnormal in groups:
            # Where the target's tissue is: its organ's normal and abnormal prompts against
            # generic normal tissue, one softmax over the prompts (kept in log space).
            lp = torch.log_softmax(logits[:, generic + organ + abnormal], dim=1)
            region = lp[:, len(generic) :].logsumexp(1) - lp[:, : len(generic)].logsumexp(1)
            weight = torch.sigmoid(region).unsqueeze(1)  # (B, 1, *S)
            dims = tuple(range(2, q.ndim))
            prototype = (q * weight).sum(dims, keepdim=True) / weight.sum(dims, keepdim=True).clamp(min=1e-3)
            qa = self.deviation(torch.cat([q, q - prototype], 1))
            # Within that tissue: abnormal against the organ's normal prompts.
            normal = organ or generic
            la = torch.einsum("bd...,pd->bp...", qa, k[normal + abnormal]) / self.dim**0.5
            lpa = torch.log_softmax(la, dim=1)
            anomalies.append(lpa[:, len(normal) :].logsumexp(1) - lpa[:, : len(normal)].logsumexp(1))
            regions.append(region)
        region_lo = torch.stack(regions, 1)  # (B, T, *S)
        anomaly_lo = torch.stack(anomalies, 1)
        if out_shape is not None and tuple(out_shape) != tuple(region_lo.shape[2:]):
            region_lo = F.interpolate(region_lo, size=tuple(out_shape), mode="trilinear", align_corners=False)
            anomaly_lo = F.interpolate(anomaly_lo, size=tuple(out_shape), mode="trilinear", align_corners=False)
        log_p = F.logsigmoid(region_lo) + F.logsigmoid(anomaly_lo)
        log_odds = log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
        score = torch.sigmoid(self.score_affine[0] * top_mean(log_odds, self.top_fraction) + self.score_affine[1])
        return AOVAOutput(
            prob=log_p.exp(),
            log_odds=log_odds,
            region_log_odds=region_lo,
            anomaly_log_odds=anomaly_lo,
            score=score,
            queries=[q],
        )


def top_mean(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the top ``fraction`` of values over the spatial axes: (B, T, *S) -> (B, T)."""
    flat = x.flatten(2)
    k = max(1, int(flat.shape[-1] * fraction))
    return flat.topk(k, dim=-1).values.mean(-1)


def soft_dice(log_odds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice per map: (B, T, *S) -> (B, T)."""
    prob = torch.sigmoid(log_odds)
    dims = tuple(range(2, prob.ndim))
    inter = (prob * target).sum(dims)
    return (2 * inter + 1.0) / (prob.sum(dims) + target.sum(dims) + 1.0)


def dice_bce(log_odds: torch.Tensor, target: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Dice loss over the maps that have foreground, plus BCE over all maps, from log-odds.

    Dice of an empty target only rewards predicting nothing, which the BCE already does;
    averaging it in lets easy empty maps hide a failing lesion map.
    """
    dice = soft_dice(log_odds, target)
    has = target.flatten(2).amax(-1) > 0
    dice_loss = (1 - dice[has]).mean() if has.any() else log_odds.new_zeros(())
    bce = F.binary_cross_entropy_with_logits(log_odds, target, pos_weight=torch.tensor(pos_weight))
    return dice_loss + bce


def region_alignment(
    queries: list[torch.Tensor],
    head: AOVAHead,
    prompts: torch.Tensor,
    regions: list[tuple[int, torch.Tensor, int]],
    temperature: float = 0.1,
) -> torch.Tensor:
    """InfoNCE between pooled region features and prompt embeddings.

    regions: (batch index, mask on the input grid (*S), index of the matching prompt); all
    prompts act as negatives. Pooled from the head's fused voxel queries.
    """
    if not regions:
        return prompts.new_zeros(())
    losses = []
    for q in queries:
        keys = F.normalize(head.text_proj(prompts), dim=-1)  # (P, d)
        pooled, labels = [], []
        for b, mask, label in regions:
            m = mask[None, None].float()
            if tuple(m.shape[2:]) != tuple(q.shape[2:]):
                m = F.adaptive_avg_pool3d(m, cast(tuple[int, int, int], tuple(q.shape[2:])))
            if m.sum() < 1e-3:
                continue
            pooled.append((q[b] * m[0]).flatten(1).sum(1) / m.sum())
            labels.append(label)
        if pooled:
            sims = F.normalize(torch.stack(pooled), dim=-1) @ keys.T / temperature
            losses.append(F.cross_entropy(sims, torch.tensor(labels, device=sims.device)))
    return torch.stack(losses).mean() if losses else prompts.new_zeros(())
