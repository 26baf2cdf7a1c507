"""Training the AOVA head on seen lesion types (`diffugts train aova`).

Backbone features are computed once per case (the backbone is frozen). Each step takes one
case and a few targets: the organs that carry lesions (positives; the ground truth is every
lesion in that organ) and organs that do not (negatives: an empty map). The target text is
drawn from the lesion's own prompts and the organ templates, so the head learns the
anomaly-aware contrast, not one phrasing. Healthy tissue of *every* organ, seen or not, is
aligned with its normal prompt; that is how the head can later find an organ it never saw a
lesion in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from diffugts.aova import AOVAHead, dice_bce, region_alignment, soft_dice
from diffugts.backbones import Backbone
from diffugts.progress import progress
from diffugts.text import TextEncoder, make_target
from diffugts.train.data import TrainingCase

log = logging.getLogger(__name__)


def organ_family(organ: str) -> str:
    """"left kidney" -> "kidney": prompts name the organ, not the side."""
    return organ.replace("left ", "").replace("right ", "")


@dataclass
class CaseFeatures:
    case: TrainingCase
    feats: list[torch.Tensor]  # selected scales, float16, (C, *S)
    positives: dict[str, np.ndarray] = field(default_factory=dict)  # organ family -> lesion mask
    prompts: dict[str, list[str]] = field(default_factory=dict)  # organ family -> lesion prompts


@torch.no_grad()
def case_features(backbone: Backbone, case: TrainingCase, index: list[int], spacing, seed: int) -> CaseFeatures:
    x = torch.from_numpy(case.x)[None, None].to(next(backbone.parameters()).device)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    feats = backbone.features(x, spacing, generator=gen)
    cf = CaseFeatures(case, [feats[i][0].half().cpu() for i in index])
    for rec in case.records:
        fam = organ_family(rec["organ"])
        mask = case.lesions == rec["id"]
        cf.positives[fam] = cf.positives.get(fam, np.zeros_like(mask)) | mask
        cf.prompts.setdefault(fam, [])
        cf.prompts[fam] += [p for p in rec["prompts"] if p not in cf.prompts[fam]]
    return cf


def downsample(mask: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Fraction of each coarse voxel covered by the mask (a soft target)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.adaptive_avg_pool3d(t, shape)[0, 0]


@dataclass
class AOVATraining:
    head: AOVAHead
    history: list[dict]
    feature_names: list[str]


def train_aova(backbone: Backbone, text: TextEncoder, cases: list[TrainingCase], *, feature_names: list[str],
               spacing, steps: int, seed: int = 0, dim: int = 64, lr: float = 2e-3, negatives: int = 2,
               seen_organs: tuple[str, ...] = ("liver", "kidney"), align_weight: float = 0.5,
               score_weight: float = 0.2, crop: tuple[int, int, int] = (32, 64, 64), positive_fraction: float = 0.7,
               pool_finest: bool = False, show_progress: bool = True, log_every: int = 50) -> AOVATraining:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    index = backbone.feature_index(feature_names)
    specs = backbone.feature_specs()
    data = [case_features(backbone, c, index, spacing, seed)
            for c in progress(cases, desc="features", unit="case", enable=show_progress)]
    head = AOVAHead([specs[i].channels for i in index], text_dim=text.dim, dim=dim, pool_finest=pool_finest)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    history: list[dict] = []
    bar = progress(range(steps), desc="train AOVA", unit="step", enable=show_progress)
    strides = [specs[i].stride for i in index]
    for step in bar:
        cf = data[rng.integers(len(data))]
        targets, truths = _sample_targets(cf, rng, negatives, seen_organs)
        box = _crop_box(cf, truths, crop, max(strides), rng, positive_fraction)
        feats = [f[(slice(None),) + tuple(slice(a // st, b // st) for a, b in box)] for f, st in zip(cf.feats, strides)]
        truths = [m[tuple(slice(a, b) for a, b in box)] for m in truths]
        texts = list(dict.fromkeys(p for t in targets for p in t.prompts + [f"normal {o} tissue" for o in
                                                                            _organs_present(cf)]))
        emb = text.embed(texts)
        groups = [([texts.index(p) for p in t.normal], [texts.index(p) for p in t.abnormal]) for t in targets]
        shape = head.work_shape([f.shape[1:] for f in feats])
        out = head([f.float()[None] for f in feats], emb, groups, out_shape=shape)
        gt = torch.stack([downsample(m, shape) for m in truths])[None]
        loss_map = dice_bce(out.log_odds, gt, pos_weight=3.0)
        with torch.no_grad():
            has = gt.flatten(2).amax(-1) > 0
            pos_dice = float(soft_dice(out.log_odds, gt)[has].mean()) if has.any() else None
        present = (gt.flatten(2).amax(-1) > 0).float()
        loss_score = F.binary_cross_entropy(out.score.clamp(1e-6, 1 - 1e-6), present)
        regions = []
        for t, m in zip(targets, truths):
            if m.any():
                regions.append((0, torch.from_numpy(m), texts.index(t.text)))
        for organ, mask in _organ_regions(cf, rng).items():
            mask = mask[tuple(slice(a, b) for a, b in box)]
            if mask.sum() > 20:
                regions.append((0, torch.from_numpy(mask), texts.index(f"normal {organ} tissue")))
        loss_align = region_alignment(out.queries, head, emb, regions)
        loss = loss_map + align_weight * loss_align + score_weight * loss_score
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step, "loss": loss.item(), "map": loss_map.item(), "align": float(loss_align.detach()),
                        "score": loss_score.item(), "positive_dice": pos_dice})
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean([h['loss'] for h in history[-20:]]):.3f}")
        if log_every and step % log_every == 0:
            log.debug("step %d loss %.4f", step, loss.item())
    head.eval().requires_grad_(False)
    return AOVATraining(head, history, feature_names)


def _crop_box(cf: CaseFeatures, truths, crop, stride: int, rng, positive_fraction: float = 0.7):
    """A crop (aligned to the coarsest feature stride) around a lesion voxel most of the
    time, anywhere otherwise: lesions are ~0.1% of a volume, so whole volumes drown them."""
    shape = cf.case.x.shape
    size = [min(c, s) // stride * stride for c, s in zip(crop, shape)]
    positives = [m for m in truths if m.any()]
    if positives and rng.random() < positive_fraction:
        where = np.argwhere(positives[rng.integers(len(positives))])
        centre = where[rng.integers(len(where))]
    else:
        centre = [rng.integers(0, s) for s in shape]
    box = []
    for c, n, s in zip(centre, size, shape):
        start = int(np.clip(c - n // 2, 0, s - n)) // stride * stride
        box.append((start, start + n))
    return box


def _organs_present(cf: CaseFeatures) -> list[str]:
    fams = {organ_family(n) for lbl, n in cf.case.organ_names.items() if np.any(cf.case.organs == lbl)}
    return sorted(fams)


def _organ_regions(cf: CaseFeatures, rng, k: int = 4) -> dict[str, np.ndarray]:
    """Healthy tissue of a few organs (lesions excluded), every organ eligible."""
    organs = _organs_present(cf)
    chosen = rng.choice(organs, size=min(k, len(organs)), replace=False)
    out = {}
    for fam in chosen:
        labels = [lbl for lbl, n in cf.case.organ_names.items() if organ_family(n) == fam]
        mask = np.isin(cf.case.organs, labels) & (cf.case.lesions == 0)
        if mask.sum() > 20:
            out[str(fam)] = mask
    return out


def _sample_targets(cf: CaseFeatures, rng, negatives: int, seen_organs):
    targets, truths = [], []
    for fam, mask in cf.positives.items():
        choices = cf.prompts[fam] + [f"{fam} tumor", f"{fam} lesion"]
        targets.append(make_target(str(rng.choice(choices)), organ=fam))
        truths.append(mask)
    empty = [o for o in seen_organs if o not in cf.positives]
    for fam in rng.permutation(empty)[:negatives]:
        targets.append(make_target(str(rng.choice([f"{fam} tumor", f"{fam} lesion", f"{fam} cyst"])), organ=str(fam)))
        truths.append(np.zeros(cf.case.x.shape, dtype=bool))
    return targets, truths


@torch.no_grad()
def evaluate_dice(head: AOVAHead, backbone: Backbone, text: TextEncoder, cases: list[TrainingCase],
                  feature_names: list[str], spacing, threshold: float = 0.5, seed: int = 0) -> list[dict]:
    """Dice of the coarse mask per (case, organ) with lesions, at full resolution."""
    index = backbone.feature_index(feature_names)
    rows = []
    for case in cases:
        cf = case_features(backbone, case, index, spacing, seed)
        for fam, mask in cf.positives.items():
            t = make_target(f"{fam} tumor", organ=fam)
            emb = text.embed(t.prompts)
            groups = [(list(range(len(t.normal))), list(range(len(t.normal), len(t.prompts))))]
            out = head([f.float()[None] for f in cf.feats], emb, groups, out_shape=case.x.shape)
            pred = out.prob[0, 0].numpy() >= threshold
            dice = 2 * (pred & mask).sum() / max(pred.sum() + mask.sum(), 1)
            rows.append({"case": case.case_id, "organ": fam, "dice": float(dice), "score": float(out.score[0, 0])})
    return rows
