"""Train the demo recipe's heads (organ grounding, AOVA + fusion, normative model, refinement,
lesion verifier)
on an existing package's backbone, for one seed: what made the shipped demo model's heads and
the second training draw that docs/benchmarks.md compares it with (two seeds run side by side,
one thread each).

    python benchmarks/train_heads.py SEED OUT [--backbone demo]

`--start aova|normative|refine|verifier`: OUT already holds the earlier stages (a run stopped later, or
heads kept while a later stage changes): only that stage and the ones after it run.
`diffugts train demo --backbone demo --seed SEED --out OUT` does the same in one process with
the recipe's provenance entry.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffugts.train.recipe import DemoRecipe
from diffugts.train.run import (
    train_aova_head,
    train_lesion_verifier,
    train_normative,
    train_organ_net,
    train_refine_head,
)

STAGES = ("organs", "aova", "normative", "refine", "verifier")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--backbone", default="demo", help="package whose backbone is reused (default: demo)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--start",
        choices=STAGES,
        default="organs",
        help="first stage to train; OUT must hold the earlier ones (default: organs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = DemoRecipe(seed=args.seed)
    start = time.time()
    first = STAGES.index(args.start)
    if first == 0 and r.organ_steps:
        train_organ_net(
            args.backbone,
            args.out,
            args.seed,
            r.aova_cases,
            r.organ_steps,
            r.organ_mr_healthy_cases,
            refit_fusion=False,
        )
    print(f"organ grounding done after {time.time() - start:.0f} s", flush=True)
    if first <= 1:
        train_aova_head(
            # OUT holds the organ network when it was trained here or by an earlier run (--start)
            args.out if r.organ_steps else args.backbone,
            args.out,
            args.seed,
            r.aova_cases,
            r.aova_steps,
            r.aova_dim,
            r.features,
            True,
            synthetic_cases=r.aova_synthetic_cases,
            randomised_cases=r.aova_randomised_cases,
            mr_healthy_cases=r.aova_mr_healthy_cases,
            fusion_recall=r.fusion_recall,
            fusion_margin_mm=r.fusion_margin_mm,
        )
    print(f"AOVA head done after {time.time() - start:.0f} s", flush=True)
    if first <= 2 and r.organ_steps and (r.normative_cases or r.normative_mr_cases):
        train_normative(
            args.out,
            None,
            args.seed,
            r.normative_cases,
            r.normative_mr_cases,
            params=r.normative_params(),
        )
    print(f"normative model done after {time.time() - start:.0f} s", flush=True)
    if first <= 3:
        train_refine_head(
            args.out,
            None,
            args.seed,
            r.refine_cases,
            r.refine_steps,
            show_progress=True,
            healthy_cases=r.refine_healthy_cases,
        )
    print(f"refinement head done after {time.time() - start:.0f} s", flush=True)
    train_lesion_verifier(args.out, None, args.seed, **r.verifier_options())
    print(f"lesion verifier done after {time.time() - start:.0f} s", flush=True)
    record(args.out, r, args.backbone)


def record(out: Path, recipe: DemoRecipe, backbone: str) -> None:
    """The package's top-level provenance: the recipe its heads follow and where its backbone
    came from (the backbone's own training record stays as it was)."""
    from diffugts.models.package import add_networks, open_package
    from diffugts.train.run import command_line

    source = open_package(backbone, verify=False)
    add_networks(
        open_package(out),
        {},
        provenance={
            "recipe": recipe.as_dict(),
            "heads_command": command_line(),
            "backbone_from": {"package": source.name, "sha256": source.sha256},
        },
    )


if __name__ == "__main__":
    main()
