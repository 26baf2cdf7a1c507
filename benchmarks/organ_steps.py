"""Organ grounding network variants (training steps, working grid, width, case count), one
training draw per call, measured on the development seeds (dev16): what docs/benchmarks.md's
"Organ grounding on a GPU" table came from.

    python benchmarks/organ_steps.py NAME SEED --steps 2400 [--cases 40 --mr 16]
        [--downsample 2 --features 8,16,24,32,48,8] [--max-seconds S] [--device cuda] [--out DIR]

It trains on the recipe's cases (diffugts.train.run: the AOVA seed range's CT cases and
lesion-free MR phantoms; ``--cases`` / ``--mr`` more of the same ranges) with the library's
``train_organs``; ``--max-seconds`` cuts a time-boxed run short (the schedule then stops
early; the steps run are printed). It then regenerates dev16 in process (the phantoms of
``diffugts phantom --seed 5101 --split unseen``, 5102 seen, 5103 MR, lesion-free 5130 CT and
5131 MR; never the evaluation seeds) and prints per set: Dice of each organ as the coarse stage
uses it (with its inclusions) against the true organ with its lesions; over the lesions, the
median log-odds of the lesion's organ inside the lesion and the share of lesion voxels inside
that organ map. ``--out``: the weights and results as DIR/NAME-sSEED.safetensors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffugts.models.defaults import DEMO_MODEL
from diffugts.models.package import open_package
from diffugts.networks.organs import OrganNet, organ_maps
from diffugts.stages.deviation import organ_with_inclusions
from diffugts.stages.preprocess import Preprocessing
from diffugts.train.aova import organ_family
from diffugts.train.data import phantom_case
from diffugts.train.organs import organ_dice, train_organs
from diffugts.train.run import _mr_healthy_cases, _seen_range_cases
from diffugts.utils.atomic import atomic_path

ORGANS_SHOWN = ("liver", "kidney", "spleen", "pancreas")


def dev16(prep: Preprocessing, n: int = 4) -> dict[str, list]:
    sets: dict[str, list] = {"ct-unseen": [], "ct-seen": [], "mr": [], "healthy-ct": [], "healthy-mr": []}
    for i in range(n):
        sets["ct-unseen"].append(phantom_case(5101, i, prep, split="unseen"))
        sets["ct-seen"].append(phantom_case(5102, i, prep, split="seen"))
        sets["mr"].append(phantom_case(5103, i, prep, split="any", modality="MR"))
    for i in range(min(n, 2)):
        sets["healthy-ct"].append(phantom_case(5130, i, prep, healthy=True))
        sets["healthy-mr"].append(phantom_case(5131, i, prep, healthy=True, modality="MR"))
    return sets


def measure(net: OrganNet, sets: dict[str, list], spacing_kji) -> dict:
    """Per set the library's organ Dice, and over its lesions the lesion organ's median log-odds
    inside each lesion and the share of the lesion inside that organ (with inclusions)."""
    out = {}
    for name, cases in sets.items():
        log_odds, inside = [], []
        for case in cases:
            lo = organ_maps(net, case.x)
            for rec in case.records:
                m, organ = case.lesions == rec["id"], organ_family(rec["organ"])
                if organ in lo and m.any():
                    log_odds.append(float(np.median(lo[organ][m])))
                    inside.append(float(organ_with_inclusions(lo[organ] > 0, spacing_kji)[m].mean()))
        out[name] = {
            "dice": organ_dice(net, cases, spacing_kji),
            "lesion_log_odds": round(float(np.median(log_odds)), 2) if log_odds else None,
            "lesion_inside": round(float(np.mean(inside)), 3) if inside else None,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("seed", type=int)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--mr", type=int, default=16)
    p.add_argument("--downsample", type=int, default=2)
    p.add_argument("--features", default="8,16,24,32,48,8")
    p.add_argument("--max-seconds", type=float)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.backends.cudnn.benchmark = True  # one input shape throughout
    prep = Preprocessing.from_dict(open_package(DEMO_MODEL).manifest["preprocessing"])
    spacing_kji = tuple(prep.spacing_mm)[::-1]
    data = _seen_range_cases(prep, a.seed, a.cases, None, False) + _mr_healthy_cases(prep, a.seed, a.mr, None, False)
    config = {"features": tuple(int(f) for f in a.features.split(",")), "downsample": a.downsample}
    t0 = time.perf_counter()
    net, losses = train_organs(
        data, spacing_kji, steps=a.steps, seed=a.seed, device=a.device, max_seconds=a.max_seconds, net_config=config
    )
    seconds = time.perf_counter() - t0
    metrics = measure(net.to(a.device), dev16(prep), spacing_kji)
    for name, m in metrics.items():
        organs = " ".join(f"{o} {m['dice'].get(o, float('nan')):.2f}" for o in ORGANS_SHOWN)
        extra = ""
        if m["lesion_inside"] is not None:
            extra = f"  lesions: log-odds {m['lesion_log_odds']}, inside {m['lesion_inside']}"
        print(f"{a.name} s{a.seed} {len(losses)}/{a.steps} steps {seconds:.0f}s  {name:10s} {organs}{extra}")
    if a.out:
        from safetensors.torch import save_file

        a.out.mkdir(parents=True, exist_ok=True)
        meta = {"config": json.dumps(net.config), "steps": str(a.steps), "steps_done": str(len(losses))}
        meta |= {"cases": f"{a.cases}+{a.mr}", "seconds": f"{seconds:.0f}", "metrics": json.dumps(metrics)}
        with atomic_path(a.out / f"{a.name}-s{a.seed}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in net.cpu().state_dict().items()}, str(tmp), metadata=meta)


if __name__ == "__main__":
    main()
