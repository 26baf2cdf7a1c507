"""Fitting the coarse-map fusion (diffugts.stages.deviation.Fusion) after the AOVA head.

For each training case and each promptable organ: the head's region and anomaly maps, the
organ with inclusions and the organ-relative deviation, exactly as inference computes them.
The voxels of the organ's scored interior (where inference scores) are the samples (lesion or
not); a three-parameter logistic regression weighs the learned anomaly log-odds against |z|.
The coarse threshold is then chosen for *recall* (the share of training lesion voxels the
coarse mask must keep): the coarse stage finds candidates, the refinement head verifies them.
"""

from __future__ import annotations

import numpy as np
import torch

from diffugts.networks.aova import AOVAHead
from diffugts.networks.organs import OrganNet, grounded_region, organ_maps
from diffugts.networks.text import TextEncoder, make_target
from diffugts.stages.deviation import DeviationParams, Fusion, organ_deviation
from diffugts.train.aova import CaseFeatures

MAX_NEGATIVES = 4000  # organ voxels sampled per case and organ (lesion voxels are all kept)


@torch.no_grad()
def fusion_samples(
    head: AOVAHead,
    text: TextEncoder,
    data: list[CaseFeatures],
    spacing_kji,
    params: DeviationParams,
    seed: int = 0,
    organ_net: OrganNet | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 2): anomaly log-odds, |z|; labels (N,)) over the cases' organs; the organ
    from ``organ_net`` where it knows it (as inference does), else the head's region map."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for cf in data:
        shape = cf.case.x.shape
        grounding = organ_maps(organ_net, cf.case.x)
        for fam in cf.organs:
            t = make_target(f"{fam} tumor", organ=fam)
            out = head(
                [f.float()[None] for f in cf.feats], text.embed(t.prompts), [t.groups(t.prompts.index)], out_shape=shape
            )
            region, anomaly = out.region_log_odds[0, 0].numpy(), out.anomaly_log_odds[0, 0].numpy()
            _, scored, z = organ_deviation(cf.case.x, grounded_region(fam, region, grounding), spacing_kji, params)
            lesion = cf.positives.get(fam, np.zeros(shape, bool)) & scored
            healthy = np.flatnonzero(scored & ~lesion)
            healthy = rng.choice(healthy, min(MAX_NEGATIVES, healthy.size), replace=False) if healthy.size else healthy
            pick = np.concatenate([np.flatnonzero(lesion), healthy])
            feats.append(np.stack([anomaly.reshape(-1)[pick], np.abs(z).reshape(-1)[pick]], 1))
            labels.append(lesion.reshape(-1)[pick])
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.float32)


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, l2: float = 1e-4, steps: int = 200, nonnegative=None
) -> tuple[np.ndarray, float]:
    """Class-balanced logistic regression (LBFGS): (weights (F,), bias). Shared by the fusion
    and the lesion verifier (train/verify.py): a handful of weights fitted on all samples at
    once, where a torch optimiser loop of a few lines is all it takes. ``nonnegative``: (F,)
    bools, weights that may only count *for* the positive class (softplus-parametrised)."""
    x = torch.from_numpy(np.asarray(features, np.float64))
    y = torch.from_numpy(np.asarray(labels, np.float64))
    pos = float(y.sum())
    weight = torch.where(y > 0, (len(y) - pos) / max(pos, 1.0), 1.0)
    signed = torch.as_tensor(np.zeros(x.shape[1], bool) if nonnegative is None else np.asarray(nonnegative, bool))
    v = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=steps, line_search_fn="strong_wolfe")

    def weights(v):
        return torch.where(signed, torch.nn.functional.softplus(v[:-1]), v[:-1])

    def closure():
        opt.zero_grad()
        w = weights(v)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + v[-1], y, weight=weight) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weights(v).detach().numpy(), float(v[-1].detach())


def fit_fusion(
    features: np.ndarray, labels: np.ndarray, params: DeviationParams, recall: float = 0.85, steps: int = 200
) -> tuple[Fusion, float]:
    """Logistic regression (class-balanced, LBFGS) and the threshold that keeps ``recall``
    of the lesion voxels."""
    (a, d), b = fit_logistic(features, labels, steps=steps)
    fusion = Fusion(float(a), float(d), b, params)
    prob = 1.0 / (1.0 + np.exp(-(np.asarray(features, np.float64) @ np.array([a, d]) + b)))
    lesion_prob = np.sort(prob[labels > 0])
    threshold = float(lesion_prob[int((1 - recall) * len(lesion_prob))]) if len(lesion_prob) else 0.5
    return fusion, float(np.clip(threshold, 0.05, 0.95))
