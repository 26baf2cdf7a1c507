"""Training the AOVA head on seen lesion types (`diffugts train aova`).

Backbone features are computed once per case (the backbone is frozen). Each step takes one
whole case (the tissue prototype of a target is a mean over the whole volume, so crops
would change it) and a few targets:

- organs that carry lesions: the lesion map learns from every lesion in that organ;
- organs that do not, *any* organ of the body, seen or not: their lesion map must stay
  empty. Every target's region map learns its organ's mask. That is how the head can later
  find the tissue of an organ it never saw a lesion in.

The target text is drawn from the lesions' own prompts and the organ templates, so the
head learns the anomaly-aware contrast, not one phrasing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from diffugts.networks.aova import AOVAHead, region_alignment, soft_dice
from diffugts.networks.backbones import Backbone
from diffugts.networks.text import TextEncoder, make_target
from diffugts.train.data import TrainingCase
from diffugts.utils.progress import progress

log = logging.getLogger(__name__)

# Organs whose masks the phantom world has and whose names prompts use.
PROMPTABLE = ("liver", "kidney", "spleen", "pancreas", "stomach", "gallbladder", "aorta")


def organ_family(organ: str) -> str:
    """ "left kidney" -> "kidney": prompts name the organ, not the side."""
    return organ.replace("left ", "").replace("right ", "")


@dataclass
class CaseFeatures:
    case: TrainingCase
    feats: list[torch.Tensor]  # selected scales, float16, (C, *S)
    positives: dict[str, np.ndarray] = field(default_factory=dict)  # organ family -> lesion mask
    prompts: dict[str, list[str]] = field(default_factory=dict)  # organ family -> lesion prompts
    organs: dict[str, np.ndarray] = field(default_factory=dict)  # organ family -> organ mask (lesions included)


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
    for label, name in case.organ_names.items():
        fam = organ_family(name)
        if fam in PROMPTABLE:
            mask = case.organs == label
            if mask.any():
                cf.organs[fam] = cf.organs.get(fam, np.zeros_like(mask)) | mask
    for fam, lesion in cf.positives.items():
        cf.organs[fam] = cf.organs.get(fam, np.zeros_like(lesion)) | lesion
    return cf


def downsample(mask: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Fraction of each coarse voxel covered by the mask (a soft target)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    k, j, i = shape
    return F.adaptive_avg_pool3d(t, (k, j, i))[0, 0]


@dataclass
class AOVATraining:
    head: AOVAHead
    history: list[dict]
    feature_names: list[str]
    data: list[CaseFeatures] = field(default_factory=list)  # the training cases' features (fusion fit)


def train_aova(
    backbone: Backbone,
    text: TextEncoder,
    cases: list[TrainingCase],
    *,
    feature_names: list[str],
    spacing,
    steps: int,
    seed: int = 0,
    dim: int = 64,
    lr: float = 2e-3,
    negatives: int = 2,
    align_weight: float = 0.2,
    score_weight: float = 0.2,
    show_progress: bool = True,
    checkpoint=None,
) -> AOVATraining:
    """``checkpoint``: a :class:`diffugts.train.checkpoint.Checkpoint` to save to and resume from."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    index = backbone.feature_index(feature_names)
    specs = backbone.feature_specs()
    data = [
        case_features(backbone, c, index, spacing, seed)
        for c in progress(cases, desc="features", unit="case", enable=show_progress)
    ]
    head = AOVAHead([specs[i].channels for i in index], text_dim=text.dim, dim=dim)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    history: list[dict] = []
    start = checkpoint.restore(head, opt, rng, history) if checkpoint else 0
    bar = progress(range(start, steps), desc="train AOVA", unit="step", enable=show_progress, total=steps - start)
    for step in bar:
        cf = data[rng.integers(len(data))]
        targets, lesions, organs = _sample_targets(cf, rng, negatives)
        texts = list(dict.fromkeys(p for t in targets for p in t.prompts))
        emb = text.embed(texts)
        shape = head.work_shape([f.shape[1:] for f in cf.feats])
        out = head([f.float()[None] for f in cf.feats], emb, [t.groups(texts.index) for t in targets], out_shape=shape)
        les = torch.stack([downsample(m, shape) for m in lesions])[None]
        org = torch.stack([downsample(m, shape) for m in organs])[None]
        loss_region = _dice_bce(out.region_log_odds, org)
        # The lesion map: BCE everywhere on the final probability, Dice where there is a lesion.
        loss_lesion = F.binary_cross_entropy_with_logits(out.log_odds, les, pos_weight=torch.tensor(3.0))
        has = les.flatten(2).amax(-1) > 0
        dice = soft_dice(out.log_odds, les)
        if has.any():
            loss_lesion = loss_lesion + (1 - dice[has]).mean()
        # Within the organ, the anomaly contrast itself, so it learns even while the region is poor.
        inside = (org > 0.5).float()
        loss_anomaly = (
            F.binary_cross_entropy_with_logits(
                out.anomaly_log_odds, les, reduction="none", pos_weight=torch.tensor(3.0)
            )
            * inside
        ).sum() / inside.sum().clamp(min=1)
        loss_score = F.binary_cross_entropy(out.score.clamp(1e-6, 1 - 1e-6), has.float())
        regions = [(0, torch.from_numpy(m), texts.index(t.text)) for t, m in zip(targets, lesions) if m.any()]
        loss_align = region_alignment(out.queries, head, emb, regions)
        loss = loss_region + loss_lesion + loss_anomaly + align_weight * loss_align + score_weight * loss_score
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(
            {
                "step": step,
                "loss": loss.item(),
                "region": loss_region.item(),
                "lesion": loss_lesion.item(),
                "anomaly": loss_anomaly.item(),
                "positive_dice": float(dice[has].mean().detach()) if has.any() else None,
            }
        )
        if checkpoint:
            checkpoint.step(step + 1, head, opt, rng, history, steps)
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean([h['loss'] for h in history[-20:]]):.3f}")
    head.eval().requires_grad_(False)
    return AOVATraining(head, history, feature_names, data)


def _dice_bce(log_odds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1 - soft_dice(log_odds, target)).mean() + F.binary_cross_entropy_with_logits(log_odds, target)


def _sample_targets(cf: CaseFeatures, rng, negatives: int):
    targets, lesions, organs = [], [], []
    for fam, mask in cf.positives.items():
        choices = cf.prompts[fam] + [f"{fam} tumor", f"{fam} lesion"]
        targets.append(make_target(str(rng.choice(choices)), organ=fam))
        lesions.append(mask)
        organs.append(cf.organs[fam])
    empty = [o for o in cf.organs if o not in cf.positives]
    for fam in rng.permutation(empty)[:negatives]:
        fam = str(fam)
        targets.append(make_target(str(rng.choice([f"{fam} tumor", f"{fam} lesion", f"{fam} cyst"])), organ=fam))
        lesions.append(np.zeros(cf.case.x.shape, dtype=bool))
        organs.append(cf.organs[fam])
    return targets, lesions, organs


@torch.no_grad()
def evaluate_dice(
    head: AOVAHead,
    backbone: Backbone,
    text: TextEncoder,
    cases: list[TrainingCase],
    feature_names: list[str],
    spacing,
    threshold: float = 0.5,
    seed: int = 0,
) -> list[dict]:
    """Dice of the coarse mask (and of the region map vs the organ) per (case, organ with lesions)."""
    index = backbone.feature_index(feature_names)
    rows = []
    for case in cases:
        cf = case_features(backbone, case, index, spacing, seed)
        for fam, mask in cf.positives.items():
            t = make_target(f"{fam} tumor", organ=fam)
            emb = text.embed(t.prompts)
            out = head([f.float()[None] for f in cf.feats], emb, [t.groups(t.prompts.index)], out_shape=case.x.shape)
            pred = out.prob[0, 0].numpy() >= threshold
            region = out.region_log_odds[0, 0].numpy() >= 0
            organ = cf.organs[fam]
            rows.append(
                {
                    "case": case.case_id,
                    "organ": fam,
                    "dice": _dice(pred, mask),
                    "score": float(out.score[0, 0]),
                    "region_dice": _dice(region, organ),
                }
            )
    return rows


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
