"""Training the residual refinement head (`diffugts train refine`).

For each seen training case: the trained AOVA head gives the coarse map of every organ that
carries lesions; pseudo-healthy synthesis inpaints the coarse mask joined with the true
lesions (dilated by a random margin, so the head also learns from regions synthesis had to
cover); the residual channels then train a small 3D U-Net on crops around lesions.
"""

from __future__ import annotations

import numpy as np
import torch

from diffugts.aova import AOVAHead, dice_bce, soft_dice
from diffugts.backbones import Backbone
from diffugts.geometry import Geometry
from diffugts.preprocess import Preprocessing, normalise
from diffugts.progress import progress
from diffugts.refine import RefineHead, shared_inputs
from diffugts.synthesis import Params, make_region, pseudo_healthy
from diffugts.text import TextEncoder, make_target
from diffugts.train.aova import case_features, organ_family
from diffugts.train.data import TrainingCase


def coarse_maps(head: AOVAHead, backbone: Backbone, text: TextEncoder, case: TrainingCase, features: list[str],
                spacing, organs: list[str]) -> dict[str, np.ndarray]:
    cf = case_features(backbone, case, backbone.feature_index(features), spacing, 0)
    out = {}
    for fam in organs:
        t = make_target(f"{fam} tumor", organ=fam)
        emb = text.embed(t.prompts)
        with torch.no_grad():
            res = head([f.float()[None] for f in cf.feats], emb, [t.groups(t.prompts.index)], out_shape=case.x.shape)
        out[fam] = res.prob[0, 0].numpy()
    return out


def refinement_example(case: TrainingCase, backbone: Backbone, head: AOVAHead, text: TextEncoder, features,
                       prep: Preprocessing, params: Params, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs (9, *S), truth (*S)) per organ with lesions, on the model grid."""
    geometry = Geometry((0, 0, 0), prep.spacing_mm, np.eye(3), case.x.shape)
    truths: dict[str, np.ndarray] = {}
    for rec in case.records:
        fam = organ_family(rec["organ"])
        truths[fam] = truths.get(fam, np.zeros(case.x.shape, bool)) | (case.lesions == rec["id"])
    coarse = coarse_maps(head, backbone, text, case, features, prep.spacing_mm, sorted(truths))
    union = np.zeros(case.x.shape, bool)
    for fam in truths:
        union |= (coarse[fam] >= 0.5) | truths[fam]
    region = make_region(union, np.asarray(prep.spacing_mm)[::-1], params.dilation_mm + rng.uniform(0, 6),
                         params.feather_mm)
    pseudo, _ = pseudo_healthy(case.volume, geometry, case.modality, region, backbone, prep,
                               Params(**{**params.__dict__, "seed": int(rng.integers(1 << 30))}))
    h = normalise(pseudo, case.modality, prep)
    shared = shared_inputs(backbone, case.x, h, region.dilated)
    return [(np.concatenate([shared, coarse[fam][None].astype(np.float32)]), truths[fam]) for fam in truths]


def train_refine(examples: list[tuple[np.ndarray, np.ndarray]], steps: int, seed: int = 0, crop=(32, 64, 64),
                 batch: int = 2, lr: float = 2e-3, features=(8, 16, 32, 64, 64, 8),
                 show_progress: bool = True) -> tuple[RefineHead, list[dict]]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    head = RefineHead(in_channels=examples[0][0].shape[0], features=features)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    head.train()
    for step in progress(range(steps), desc="train refinement", unit="step", enable=show_progress):
        xs, ys = [], []
        for _ in range(batch):
            inp, truth = examples[rng.integers(len(examples))]
            box = _crop(truth, crop, rng)
            xs.append(inp[(slice(None),) + box])
            ys.append(truth[box][None].astype(np.float32))
        x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
        logits = head(x)
        loss = dice_bce(logits, y, pos_weight=3.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            has = y.flatten(2).amax(-1) > 0
            dice = float(soft_dice(logits, y)[has].mean()) if has.any() else None
        history.append({"step": step, "loss": loss.item(), "positive_dice": dice})
    head.eval().requires_grad_(False)
    return head, history


def _crop(truth: np.ndarray, crop, rng, positive_fraction: float = 0.8):
    size = [min(c, s) for c, s in zip(crop, truth.shape)]
    if truth.any() and rng.random() < positive_fraction:
        where = np.argwhere(truth)
        centre = where[rng.integers(len(where))]
    else:
        centre = [rng.integers(0, s) for s in truth.shape]
    return tuple(slice(int(np.clip(c - n // 2, 0, s - n)), int(np.clip(c - n // 2, 0, s - n)) + n)
                 for c, n, s in zip(centre, size, truth.shape))


def evaluate_refine(head: RefineHead, examples) -> float:
    from diffugts.refine import refine_probability

    scores = []
    for inp, truth in examples:
        prob = refine_probability(head, inp[:-1], inp[-1])
        pred = (prob >= 0.5) & (inp[7] > 0)
        scores.append(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))
    return float(np.mean(scores)) if scores else float("nan")

