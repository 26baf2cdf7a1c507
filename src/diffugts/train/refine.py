"""Training the residual refinement head (`diffugts train refine`).

For each training case (seen lesion types, and lesion-free cases): the trained AOVA head and
the package's fusion give the coarse maps of every organ that carries lesions and of
lesion-free host organs; pseudo-healthy synthesis inpaints the coarse masks joined with the
true lesions (dilated by a random margin, so the head also learns from regions synthesis had
to cover); the residual channels and each target's own channels (coarse map, organ-relative
deviation, organ) then train a small 3D U-Net on crops centred on lesions, on coarse
candidates (most of them false in lesion-free organs) and anywhere. A head trained only on
regions that hold a lesion learns to copy its region; this one must also say "nothing".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffugts.artifacts.geometry import Geometry
from diffugts.config import SynthesisParams
from diffugts.networks.aova import AOVAHead, dice_bce, soft_dice
from diffugts.networks.backbones import Backbone
from diffugts.networks.organs import OrganNet, grounded_region, organ_maps
from diffugts.networks.refine import LEGACY_TARGET_CHANNELS, SHARED_CHANNELS as SHARED, RefineHead
from diffugts.networks.text import TextEncoder, make_target
from diffugts.stages.deviation import FusedMaps, Fusion
from diffugts.stages.normative import Findings, NormativeModel
from diffugts.stages.preprocess import Preprocessing, normalise
from diffugts.stages.refine import shared_inputs, target_inputs
from diffugts.stages.synthesize import make_region, pseudo_healthy
from diffugts.train.aova import case_features, organ_family
from diffugts.train.data import TrainingCase
from diffugts.utils.progress import progress

HOST_FAMILIES = ("liver", "kidney", "spleen", "pancreas")  # organs a lesion can lie in (phantom.lesions)


@dataclass
class Example:
    """One target of one case on the model grid: the head's inputs, the truth, and the
    candidates (the target's coarse mask) that crops are centred on."""

    inputs: np.ndarray  # (SHARED_CHANNELS + len(channels), *S)
    truth: np.ndarray  # bool (*S); empty for a false candidate
    candidates: np.ndarray  # bool (*S)
    findings: Findings | None = None  # the normative model's, if asked for (diffugts.stages.normative)

    @property
    def normative(self) -> np.ndarray | None:
        """bool (*S): the normative model's candidates, if asked for."""
        return self.findings.candidates if self.findings is not None else None


def coarse_maps(
    head: AOVAHead,
    backbone: Backbone,
    text: TextEncoder,
    case: TrainingCase,
    features: list[str],
    spacing,
    organs: list[str],
    fusion: Fusion | None = None,
    grounding: dict | None = None,
) -> dict[str, FusedMaps | np.ndarray]:
    """Per organ its coarse maps as inference makes them: fused maps (prob, organ, z) with the
    package's fusion, else the AOVA probability alone. ``grounding``: the organ network's
    log-odds per organ (:func:`organ_maps`; None: the head's own region maps)."""
    cf = case_features(backbone, case, backbone.feature_index(features), spacing, 0)
    grounding = grounding or {}
    out = {}
    for fam in organs:
        t = make_target(f"{fam} tumor", organ=fam)
        emb = text.embed(t.prompts)
        with torch.no_grad():
            res = head([f.float()[None] for f in cf.feats], emb, [t.groups(t.prompts.index)], out_shape=case.x.shape)
        out[fam] = (
            res.prob[0, 0].numpy()
            if fusion is None
            else fusion.maps(
                case.x,
                grounded_region(fam, res.region_log_odds[0, 0].numpy(), grounding),
                res.anomaly_log_odds[0, 0].numpy(),
                tuple(spacing)[::-1],
            )
        )
    return out


def refinement_example(
    case: TrainingCase,
    backbone: Backbone,
    head: AOVAHead,
    text: TextEncoder,
    features,
    prep: Preprocessing,
    params: SynthesisParams,
    rng,
    fusion: Fusion | None = None,
    threshold: float = 0.5,
    channels=LEGACY_TARGET_CHANNELS,
    negatives: int = 1,
    organ_net: OrganNet | None = None,
    normative: NormativeModel | None = None,
    synthesize: bool = True,
) -> list[Example]:
    """The examples of one case: every organ with lesions, and ``negatives`` lesion-free host
    organs (every host organ of a healthy case) whose coarse candidates are false ones: the
    head must learn to answer "nothing here" as well as to delineate. With a ``normative``
    model each example carries its candidates, made as inference makes them for the lesion
    verifier: synthesis inpaints the coarse masks and the candidates (as the attention stage's
    masks hold them), never a true lesion no mask covers, so that the residual |x - H| the
    verifier weighs means at fitting what it means at inference. Without one the true lesions
    are inpainted too: the refinement head learns to delineate every lesion. ``synthesize=False``
    skips synthesis (H = x, residual 0): candidates and their geometric and normative evidence
    only, what the verifier's offline proxy needs (benchmarks/verifier_proxy.py), at a tenth of
    the time; the random draws are the same, so the candidates are too."""
    geometry = Geometry((0, 0, 0), prep.spacing_mm, np.eye(3), case.x.shape)
    truths: dict[str, np.ndarray] = {}
    for rec in case.records:
        fam = organ_family(rec["organ"])
        truths[fam] = truths.get(fam, np.zeros(case.x.shape, bool)) | (case.lesions == rec["id"])
    empty = [f for f in HOST_FAMILIES if f not in truths]
    negative = empty if not truths else [str(f) for f in rng.permutation(empty)[:negatives]]
    organs = sorted(truths) + negative
    grounding = organ_maps(organ_net, case.x)  # the coarse maps' organs, and the seeds' confidence
    maps = coarse_maps(head, backbone, text, case, features, prep.spacing_mm, organs, fusion, grounding)
    prob = {f: m.prob if isinstance(m, FusedMaps) else m for f, m in maps.items()}
    spacing_kji = tuple(prep.spacing_mm)[::-1]
    found = {}
    for fam in organs:
        m = maps[fam]
        if normative is not None and isinstance(m, FusedMaps):
            found[fam] = normative.findings(case.x, m.organ, fam, case.modality, spacing_kji, grounding.get(fam))
    union = np.zeros(case.x.shape, bool)
    for fam in organs:
        union |= prob[fam] >= threshold
        if normative is None:
            union |= truths.get(fam, False)
        elif fam in found:
            union |= found[fam].candidates
    if not union.any():
        return []
    assert case.volume is not None  # refinement cases keep their study-grid volume
    region = make_region(union, prep.spacing_mm[::-1], params.dilation_mm + rng.uniform(0, 6), params.feather_mm)
    synthesis = SynthesisParams(**{**params.__dict__, "seed": int(rng.integers(1 << 30))})
    pseudo = (
        pseudo_healthy(case.volume, geometry, case.modality, region, backbone, prep, synthesis)[0]
        if synthesize
        else case.volume
    )
    h, inpainted = normalise(pseudo, case.modality, prep), region.dilated
    shared = shared_inputs(backbone, case.x, h, inpainted)
    examples = []
    for fam in organs:
        m = maps[fam]
        organ = m.organ if isinstance(m, FusedMaps) else None
        own = target_inputs(channels, prob[fam], organ, case.x, spacing_kji, fusion.deviation if fusion else None)
        examples.append(
            Example(
                np.concatenate([shared, own]),
                truths.get(fam, np.zeros(case.x.shape, bool)),
                prob[fam] >= threshold,
                found.get(fam),
            )
        )
    return examples


def train_refine(
    examples: list[Example],
    steps: int,
    seed: int = 0,
    crop=(32, 64, 64),
    batch: int = 2,
    lr: float = 2e-3,
    features=(8, 16, 32, 64, 64, 8),
    show_progress: bool = True,
    checkpoint=None,
) -> tuple[RefineHead, list[dict]]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    head = RefineHead(in_channels=examples[0].inputs.shape[0], features=features)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    history: list[dict] = []
    head.train()
    start = checkpoint.restore(head, opt, rng, history) if checkpoint else 0  # diffugts.train.checkpoint
    for step in progress(range(start, steps), desc="train refinement", unit="step", enable=show_progress):
        xs, ys = [], []
        for _ in range(batch):
            ex = examples[rng.integers(len(examples))]
            box = _crop(ex.truth, ex.candidates, crop, rng)
            xs.append(ex.inputs[(slice(None),) + box])
            ys.append(ex.truth[box][None].astype(np.float32))
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
        if checkpoint:
            checkpoint.step(step + 1, head, opt, rng, history, steps)
    head.eval().requires_grad_(False)
    return head, history


def _crop(
    truth: np.ndarray, candidates: np.ndarray, crop, rng, lesion_fraction: float = 0.5, candidate_fraction: float = 0.35
):
    """A crop centred on a lesion voxel, on a coarse candidate (true or false), or anywhere."""
    size = [min(c, s) for c, s in zip(crop, truth.shape)]
    r = rng.random()
    if truth.any() and r < lesion_fraction:
        where = np.argwhere(truth)
        centre = where[rng.integers(len(where))]
    elif candidates.any() and r < lesion_fraction + candidate_fraction:
        where = np.argwhere(candidates)
        centre = where[rng.integers(len(where))]
    else:
        centre = [rng.integers(0, s) for s in truth.shape]
    return tuple(
        slice(int(np.clip(c - n // 2, 0, s - n)), int(np.clip(c - n // 2, 0, s - n)) + n)
        for c, n, s in zip(centre, size, truth.shape)
    )


def held_out_probabilities(head: RefineHead, examples: list[Example]) -> list[np.ndarray]:
    """The head's refined probability of each example, inside its inpainted region (0 outside,
    as inference restricts it)."""
    from diffugts.stages.refine import refine_probability

    return [
        refine_probability(head, ex.inputs[:SHARED], ex.inputs[SHARED:][None])[0] * (ex.inputs[SHARED - 1] > 0)
        for ex in examples
    ]


THRESHOLD_GRID = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))


def calibrate_threshold(probs: list[np.ndarray], examples: list[Example], grid=THRESHOLD_GRID) -> float:
    """The threshold with the best pooled Dice over held-out examples, lesion-free ones
    included: every voxel marked where there is no lesion counts against it."""
    best, best_dice = 0.5, -1.0
    for t in grid:
        tp = sum(int(((p >= t) & e.truth).sum()) for p, e in zip(probs, examples))
        marked = sum(int((p >= t).sum()) for p in probs)
        truth = sum(int(e.truth.sum()) for e in examples)
        d = 2 * tp / max(marked + truth, 1)
        if d > best_dice:
            best, best_dice = float(t), d
    return best


def evaluate_refine(
    head: RefineHead, examples: list[Example], threshold: float = 0.5, probs: list[np.ndarray] | None = None
) -> dict:
    """Held-out Dice over the examples with a lesion, and false-positive voxels (mL-free count)
    over the lesion-free ones (inside the inpainted region, as inference restricts them)."""
    probs = probs if probs is not None else held_out_probabilities(head, examples)
    dice, false_voxels = [], []
    for prob, ex in zip(probs, examples):
        pred = prob >= threshold
        if ex.truth.any():
            dice.append(2 * (pred & ex.truth).sum() / max(pred.sum() + ex.truth.sum(), 1))
        else:
            false_voxels.append(int(pred.sum()))
    return {
        "dice": float(np.mean(dice)) if dice else float("nan"),
        "false_voxels_per_negative": float(np.mean(false_voxels)) if false_voxels else float("nan"),
    }
