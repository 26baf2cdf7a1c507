"""Training the organ grounding network (diffugts.networks.organs) on phantom organ labels.

Every step takes one whole case, as seen or (with probability ``randomise_p``) with random
per-tissue intensities (diffugts.train.randomise), so the network learns organs by place and
shape rather than grey level; lesion-free MR phantoms give it MR anatomy. Each organ's label
holds the lesions inside it. Loss: Dice (MONAI's DiceLoss, organs only) + cross-entropy
weighted per class by the square root of median-frequency balancing (``class_weights``): the
unweighted loss let one training draw of two lose the pancreas (0.2 % of the voxels, its
voxels given to background and stomach; docs/benchmarks.md).

Painted lesions (``anomaly_p``): real lesions reach the labels only where the training cases
hold them (seen types, liver and kidneys), so the network was unsure of lesion tissue in the
pancreas and spleen and in MR (log-odds median 2 inside missed lesions, below the confident
seeds' 4). With probability ``anomaly_p`` a step paints the discriminator's generic anomalies
(diffugts.train.anomalies.organ_relative_anomaly) into each host organ and keeps them
labelled as that organ: unlike-the-organ tissue inside an organ is still the organ. Measured
against unpainted controls it moved those log-odds no more than noise, so the recipe leaves it
off (docs/benchmarks.md, "A surer organ network").
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy import ndimage

from diffugts.networks.organs import OrganNet
from diffugts.train.anomalies import RelativeAnomalySpec, organ_relative_anomaly, organ_spread
from diffugts.train.aova import PROMPTABLE, organ_family
from diffugts.train.data import TrainingCase
from diffugts.train.randomise import randomise
from diffugts.utils.progress import progress

ORGANS = list(PROMPTABLE)


def organ_labels(case: TrainingCase, organs: list[str]) -> np.ndarray:
    """Per voxel the index (1-based) of its organ family in ``organs``, lesions given to the
    organ that holds them; 0 elsewhere."""
    out = np.zeros(case.x.shape, np.int64)
    for label, name in case.organ_names.items():
        fam = organ_family(name)
        if fam in organs:
            out[case.organs == label] = organs.index(fam) + 1
    for rec in case.records:
        fam = organ_family(rec["organ"])
        if fam in organs:
            out[case.lesions == rec["id"]] = organs.index(fam) + 1
    return out


def with_painted_lesions(
    case: TrainingCase,
    rng: np.random.Generator,
    spacing_kji,
    chance: float = 0.6,
    floor: float = 0.02,
) -> TrainingCase:
    """A copy of ``case`` whose image has generic anomalies painted into each host organ
    (diffugts.train.refine.HOST_FAMILIES) with probability ``chance``; the labels stay as
    they are (the painted voxels are their organ's). Shifts are multiples of the organ's
    spread as the normative model measures it (its 2.5 mm local mean in the organ's
    interior; at least ``floor``, model units), so CT, MR and randomised copies alike."""
    from dataclasses import replace

    from diffugts.stages.deviation import DeviationParams, organ_interior
    from diffugts.train.refine import HOST_FAMILIES

    sp = np.asarray(spacing_kji, dtype=np.float64)
    x = case.x
    for label, name in sorted(case.organ_names.items()):
        if organ_family(name) not in HOST_FAMILIES or rng.random() >= chance:
            continue
        whole = (case.organs == label) & (case.lesions == 0)
        if not whole.any():
            continue
        # On the organ's box: the blob, its distance map and the local mean never reach past it.
        box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in ndimage.find_objects(whole.astype(np.int8))[0])
        organ = whole[box]
        inner = organ_interior(organ, sp, DeviationParams())
        if inner.sum() < 10:
            continue
        spread = organ_spread(x[box], organ, inner, sp, floor)
        painted, _ = organ_relative_anomaly(x[box], organ, spread, sp, rng, RelativeAnomalySpec(), clip=False)
        x = x.copy() if x is case.x else x
        x[box] = painted
    return replace(case, x=x) if x is not case.x else case


def class_weights(labels: list[np.ndarray], classes: int) -> torch.Tensor:
    """Cross-entropy weight per class (background first): sqrt(median frequency / frequency)
    over the training labels, so background weighs ~0.1 and the smallest organs 1.5-2.5; a
    class absent from every label gets the largest weight present."""
    counts = sum(np.bincount(lab.ravel(), minlength=classes)[:classes] for lab in labels)
    freq = np.asarray(counts, np.float64) / max(float(np.sum(counts)), 1.0)
    present = freq > 0
    w = np.ones(classes)
    w[present] = np.sqrt(np.median(freq[present]) / freq[present])
    w[~present] = w[present].max() if present.any() else 1.0
    return torch.tensor(w, dtype=torch.float32)


def train_organs(
    cases: list[TrainingCase],
    spacing_kji,
    *,
    steps: int,
    seed: int = 0,
    lr: float = 3e-3,
    randomise_p: float = 0.5,
    organs: list[str] | None = None,
    show_progress: bool = True,
    device: str | torch.device = "cpu",
    max_seconds: float | None = None,
    net_config: dict | None = None,
    anomaly_p: float = 0.0,
    init: dict | None = None,
) -> tuple[OrganNet, list[float]]:
    """``max_seconds``: stop after that much wall time even if fewer than ``steps`` ran (the
    learning-rate schedule is then cut short; ``len(history)`` says how many ran), for
    time-boxed runs on a lent GPU. ``net_config``: OrganNet arguments other than the organs
    (``features``, ``downsample``). ``anomaly_p``: the share of steps with painted lesions
    (:func:`with_painted_lesions`). ``init``: a state dict to start from (fine-tuning a
    network of the same config)."""
    from monai.losses import DiceLoss

    organs = organs or ORGANS
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    label_arrays = [organ_labels(c, organs) for c in cases]
    labels = [torch.from_numpy(lab)[None, None] for lab in label_arrays]
    ce = torch.nn.CrossEntropyLoss(weight=class_weights(label_arrays, len(organs) + 1).to(device))
    dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False)
    net = OrganNet(organs, **(net_config or {}))
    if init is not None:
        net.load_state_dict(init)
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    history: list[float] = []
    net.train()
    end = time.monotonic() + max_seconds if max_seconds is not None else float("inf")
    for _ in progress(range(steps), desc="train organs", unit="step", enable=show_progress):
        if time.monotonic() >= end:
            break
        n = int(rng.integers(len(cases)))
        case = cases[n]
        if rng.random() < randomise_p:
            case = randomise(case, rng, spacing_kji)
        if anomaly_p and rng.random() < anomaly_p:
            case = with_painted_lesions(case, rng, spacing_kji)
        x = torch.from_numpy(case.x)[None, None].to(device)
        logits, y = net(x), labels[n].to(device)
        loss = dice(logits, y) + ce(logits, y[:, 0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    return net.cpu().eval().requires_grad_(False), history


def organ_dice(net: OrganNet, cases: list[TrainingCase], spacing_kji) -> dict[str, float]:
    """Mean Dice per organ family of the organs with their inclusions (as the coarse stage makes
    them, diffugts.stages.deviation) against the truth, over ``cases`` (held out)."""
    from diffugts.networks.organs import organ_maps
    from diffugts.stages.deviation import organ_from_log_odds

    scores: dict[str, list[float]] = {}
    for case in cases:
        truth = organ_labels(case, net.organs)
        for n, (organ, lo) in enumerate(organ_maps(net, case.x).items(), start=1):
            t = truth == n
            if not t.any():
                continue
            p = organ_from_log_odds(lo, spacing_kji)
            scores.setdefault(organ, []).append(float(2 * (p & t).sum() / (p.sum() + t.sum())))
    return {organ: round(float(np.mean(v)), 3) for organ, v in scores.items()}
