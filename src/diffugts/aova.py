"""Anomaly-aware open-vocabulary attention (AOVA) maps.

Frozen multi-scale backbone features are matched against text embeddings of a target's
prompts. Per scale, small trainable adapters map features to queries Q and text to keys K;
attention logits QK^T / sqrt(d) are soft-maxed **over the prompts** of one target, normal
and abnormal together (the anomaly-aware contrast), and the probability mass on the
abnormal prompts is the voxel's anomaly probability for that target. Scales are fused with
learned weights at the finest feature resolution; an image-level anomaly score comes from
the top of the fused log-odds map.

Losses (decisions, see DESIGN.md): Dice + BCE on the fused map, a contrastive alignment of
pooled region features with prompt embeddings (lesion <-> abnormal prompts, healthy organ
<-> its normal prompts), and BCE on the image-level score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


@dataclass
class AOVAOutput:
    prob: torch.Tensor  # (B, T, *spatial) anomaly probability per target, finest scale
    log_odds: torch.Tensor  # (B, T, *spatial) log(p_abnormal / p_normal)
    score: torch.Tensor  # (B, T) image-level anomaly probability
    queries: list[torch.Tensor]  # per scale (B, d, *spatial_s): adapted features


class AOVAHead(nn.Module):
    def __init__(self, feature_channels: list[int], text_dim: int = 384, dim: int = 64, top_fraction: float = 0.002):
        super().__init__()
        self.config = {"feature_channels": list(feature_channels), "text_dim": text_dim, "dim": dim,
                       "top_fraction": top_fraction}
        self.dim = dim
        self.top_fraction = top_fraction
        groups = 8 if dim % 8 == 0 else 1
        # Pointwise projection, then a depthwise 3x3x3 for a little spatial context: a full
        # 3x3x3 convolution at the finest scale would cost ~30x more for no measured gain.
        self.adapters = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(c, dim, 1),
                nn.GroupNorm(groups, dim),
                nn.GELU(),
                nn.Conv3d(dim, dim, 3, padding=1, groups=dim),
                nn.Conv3d(dim, dim, 1),
            )
            for c in feature_channels
        )
        self.text_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(), nn.Linear(dim, dim)) for _ in feature_channels
        )
        self.scale_logits = nn.Parameter(torch.zeros(len(feature_channels)))
        self.score_affine = nn.Parameter(torch.tensor([1.0, 0.0]))

    @classmethod
    def from_config(cls, config: dict) -> "AOVAHead":
        return cls(**config)

    def forward(self, features: list[torch.Tensor], prompts: torch.Tensor, groups: list[tuple[list[int], list[int]]],
                out_shape: tuple[int, ...] | None = None) -> AOVAOutput:
        """features: per scale (B, C_s, *S_s); prompts: (P, text_dim) embeddings;
        groups: per target (normal prompt indices, abnormal prompt indices)."""
        out_shape = tuple(out_shape or max((f.shape[2:] for f in features), key=lambda s: torch.Size(s).numel()))
        weights = torch.softmax(self.scale_logits, 0)
        fused = None
        queries = []
        for s, feat in enumerate(features):
            q = self.adapters[s](feat)  # (B, d, *S)
            k = self.text_proj[s](prompts)  # (P, d)
            queries.append(q)
            logits = torch.einsum("bd...,pd->bp...", q, k) / self.dim ** 0.5  # (B, P, *S)
            per_target = []
            for normal, abnormal in groups:
                lp = torch.log_softmax(logits[:, normal + abnormal], dim=1)
                p_abn = lp[:, len(normal):].logsumexp(1).exp()
                per_target.append(p_abn)
            prob_s = torch.stack(per_target, 1)  # (B, T, *S)
            if tuple(prob_s.shape[2:]) != out_shape:
                prob_s = F.interpolate(prob_s, size=out_shape, mode="trilinear", align_corners=False)
            fused = weights[s] * prob_s if fused is None else fused + weights[s] * prob_s
        prob = fused.clamp(EPS, 1 - EPS)
        log_odds = torch.log(prob) - torch.log1p(-prob)
        score = torch.sigmoid(self.score_affine[0] * top_mean(log_odds, self.top_fraction) + self.score_affine[1])
        return AOVAOutput(prob=prob, log_odds=log_odds, score=score, queries=queries)


def top_mean(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the top ``fraction`` of values over the spatial axes: (B, T, *S) -> (B, T)."""
    flat = x.flatten(2)
    k = max(1, int(flat.shape[-1] * fraction))
    return flat.topk(k, dim=-1).values.mean(-1)


def dice_bce(prob: torch.Tensor, target: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Soft Dice (over maps with any foreground, plus an empty-map term) + BCE."""
    dims = tuple(range(2, prob.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    dice = 1 - (2 * inter + 1.0) / (denom + 1.0)
    weight = torch.where(target > 0, torch.full_like(target, pos_weight), torch.ones_like(target))
    bce = F.binary_cross_entropy(prob.clamp(EPS, 1 - EPS), target, weight=weight)
    return dice.mean() + bce


def region_alignment(queries: list[torch.Tensor], head: AOVAHead, prompts: torch.Tensor,
                     regions: list[tuple[int, torch.Tensor, int]], temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE between pooled region features and prompt embeddings.

    regions: (batch index, mask on the finest grid (*S), index of the matching prompt); all
    prompts act as negatives. Pooled per scale through the head's own adapters.
    """
    if not regions:
        return prompts.new_zeros(())
    losses = []
    for s, q in enumerate(queries):
        keys = F.normalize(head.text_proj[s](prompts), dim=-1)  # (P, d)
        pooled, labels = [], []
        for b, mask, label in regions:
            m = mask[None, None].float()
            if tuple(m.shape[2:]) != tuple(q.shape[2:]):
                m = F.adaptive_avg_pool3d(m, q.shape[2:])
            if m.sum() < 1e-3:
                continue
            pooled.append((q[b] * m[0]).flatten(1).sum(1) / m.sum())
            labels.append(label)
        if pooled:
            sims = F.normalize(torch.stack(pooled), dim=-1) @ keys.T / temperature
            losses.append(F.cross_entropy(sims, torch.tensor(labels, device=sims.device)))
    return torch.stack(losses).mean() if losses else prompts.new_zeros(())
