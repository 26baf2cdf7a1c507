"""Organ Dice of a package on phantom case folders: the AOVA head's region map against the
organ grounding network (docs/benchmarks.md, "Organ grounding"), each as the coarse stage uses
it (the organ with its inclusions), against the true organ with its lesions.

    python benchmarks/organ_dice.py MODEL FOLDER [FOLDER ...]

FOLDER: `diffugts phantom --no-dicom` output (volume.nii, organs.nii.gz, lesions.nii.gz,
case.json per case). Prints mean Dice per (contrast, organ) for both sources.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from diffugts.artifacts.study import Study
from diffugts.core import Core

ORGANS = {
    "liver": ("liver",),
    "kidney": ("left kidney", "right kidney"),
    "spleen": ("spleen",),
    "pancreas": ("pancreas",),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    grounded = Core(args.model)
    if grounded.organ_net is None:
        raise SystemExit(f"{args.model}: the package has no organ network")
    plain = Core(args.model, backbone=grounded.backbone)
    plain.organ_net = None  # the head's own region map
    prompts = [f"{o} tumor" for o in ORGANS]
    scores: dict[tuple, list[float]] = defaultdict(list)
    for case_dir in sorted(d for f in args.folders for d in f.iterdir() if (d / "case.json").is_file()):
        case = json.loads((case_dir / "case.json").read_text())
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "organs.nii.gz")))
        lesions = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "lesions.nii.gz")))
        study = Study.from_image(sitk.ReadImage(str(case_dir / "volume.nii")), case["modality"])
        contrast = case.get("mr_contrast") or case["modality"]
        for source, core in (("region", plain), ("network", grounded)):
            prepared = core.prepare(study)
            organs = core.attend(prepared, prompts).coarse.organ  # on the model grid
            for (organ, names), pred in zip(ORGANS.items(), organs):
                ids = [o["label"] for o in case["organs"] if o["name"] in names]
                held = [r["id"] for r in case["lesions"] if r["organ"] in names]
                truth = np.isin(labels, ids) | np.isin(lesions, held)
                if pred.shape != truth.shape:
                    pred = prepared.space.to_study(pred.astype(np.float32)) >= 0.5
                scores[(contrast, organ, source)].append(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))
    for (contrast, organ, source), v in sorted(scores.items()):
        print(f"{contrast:3s} {organ:9s} {source:8s} {np.mean(v):.2f}  (n={len(v)})")


if __name__ == "__main__":
    main()
