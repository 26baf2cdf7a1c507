"""Pseudo-healthy synthesis quality with a trained model, from the true lesion masks.

    python benchmarks/synthesis_fidelity.py --cases local_outputs/eval --png docs/images/synthesis_before_after.png

For every phantom case under --cases (folders with case.json, any depth), synthesis
inpaints the *true* lesion mask (dilated as usual), so this measures synthesis alone, not the
attention stage. Prints, per lesion type and seen / unseen split, the fidelity (1 = the
lesion now has its organ's intensity, 0 = unchanged; docs/synthesis.md) and the mean
absolute error to the phantom's healthy twin inside the lesion before (x) and after (H), and
draws one before / after / difference row per lesion type.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from diffugts.config import SynthesisParams
from diffugts.phantom.truth import load_phantom_truth
from diffugts.runners.evaluate import load_cases
from diffugts.stages.synthesize import make_region, pseudo_healthy
from diffugts.stages.synthesize.fidelity import fidelity
from diffugts.stages.synthesize.masks import spacing_kji


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--model", default=None, help="model package (default: the shipped demo model)")
    ap.add_argument("--png", default=None, help="write the before / after picture here")
    ap.add_argument("--modality", default="CT", help="only cases of this modality (CT or MR; 'any' for all)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the method's)")
    ap.add_argument("--strength", type=float, default=None, help="noise level to start from (default: the method's)")
    args = ap.parse_args()

    from diffugts.models.defaults import default_model
    from diffugts.models.package import open_package
    from diffugts.networks.backbones import load_backbone
    from diffugts.stages.preprocess import Preprocessing

    torch.set_num_threads(1)  # the demo networks are too small for a second thread to pay
    pkg = open_package(args.model or default_model())
    backbone = load_backbone(pkg, "cpu")
    prep = Preprocessing.from_dict(pkg.manifest["preprocessing"])
    params = SynthesisParams(**{k: v for k, v in (("steps", args.steps), ("strength", args.strength)) if v is not None})
    params.validate()
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    examples: dict[str, tuple] = {}
    for case in load_cases(args.cases):
        if args.modality != "any" and case.modality != args.modality:
            continue
        truth = load_phantom_truth(case.root, case.geometry, case.volume)
        region = make_region(truth.lesion_map > 0, spacing_kji(case.geometry), params.dilation_mm, params.feather_mm)
        pseudo, _ = pseudo_healthy(case.volume, case.geometry, case.modality, region, backbone, prep, params)
        fid = fidelity(case.volume, pseudo, truth, region.dilated)
        splits = {r["id"]: r["split"] for r in case.meta["lesions"]}
        for les in fid["lesions"]:
            groups[(les["type"], splits[les["id"]])].append(les)
            if les["type"] not in examples or les["voxels"] > examples[les["type"]][3]:
                examples[les["type"]] = (case, pseudo, truth.lesion_map == les["id"], les["voxels"], les["organ"])

    rows = []
    print(
        f"model {pkg.name} ({pkg.sha256[:12]}), strength {params.strength}, {params.steps} steps, "
        f"dilation {params.dilation_mm} mm\n"
    )
    print(
        f"{'lesion type':16s} {'split':7s} {'n':>3s} {'fidelity':>9s} {'MAE to twin, x':>15s} {'MAE to twin, H':>15s}"
    )
    for (kind, split), lesions in sorted(groups.items()):
        fids = [e["fidelity"] for e in lesions if e["fidelity"] is not None]
        before = [e["mae_to_healthy_input"] for e in lesions if e.get("mae_to_healthy_input") is not None]
        after = [e["mae_to_healthy"] for e in lesions if e.get("mae_to_healthy") is not None]
        row = {
            "type": kind,
            "split": split,
            "n": len(lesions),
            "fidelity": round(float(np.median(fids)), 3) if fids else None,
            "mae_x": round(float(np.mean(before)), 1) if before else None,
            "mae_h": round(float(np.mean(after)), 1) if after else None,
        }
        rows.append(row)
        shown = {k: "-" if row[k] is None else row[k] for k in ("fidelity", "mae_x", "mae_h")}
        print(f"{kind:16s} {split:7s} {row['n']:3d} {shown['fidelity']:>9} {shown['mae_x']:>15} {shown['mae_h']:>15}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.png:
        picture(examples, Path(args.png))
        print(f"\nwrote {args.png}")


def picture(examples: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(examples)
    fig, axes = plt.subplots(len(kinds), 3, figsize=(7.5, 2.5 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        case, pseudo, lesion, _, organ = examples[kind]
        k = int(np.argmax(lesion.sum((1, 2))))
        jj, ii = np.nonzero(lesion[k])
        cj, ci = int(jj.mean()), int(ii.mean())
        half = 24
        box = (slice(max(cj - half, 0), cj + half), slice(max(ci - half, 0), ci + half))
        window = (-150, 250) if case.modality == "CT" else tuple(np.percentile(case.volume, [1, 99.5]))
        for ax, img, title in (
            (row[0], case.volume, f"{kind} ({organ})"),
            (row[1], pseudo, "pseudo-healthy H"),
            (row[2], case.volume - pseudo, "x - H"),
        ):
            if title == "x - H":
                ax.imshow(img[k][box], cmap="coolwarm", vmin=-120, vmax=120)
            else:
                ax.imshow(img[k][box], cmap="gray", vmin=window[0], vmax=window[1])
                ax.contour(lesion[k][box], levels=[0.5], colors="yellow", linewidths=0.8)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main()
