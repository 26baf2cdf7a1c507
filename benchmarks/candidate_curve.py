"""What the normative candidate stage touches before any verifier, with its seed threshold moved.

    python benchmarks/candidate_curve.py MODEL FOLDER [FOLDER ...] [--seed S] [--shifts A,B,...]

Each case is made as benchmarks/verifier_proxy.py makes it (the verifier's example maker
without synthesis, prompted as `evaluate` prompts). Per target, the package's normative findings
are re-cut with seeds above each shift on the relative score's scale (0: the package's seed
threshold; -1: its growing one), grown and opened as the package grows them
(diffugts.stages.normative.NormativeModel.reseeded), and components under the minimum volume
dropped. Cells per folder: lesions a candidate touches / lesions, or candidates per lesion-free
study; the last two columns sum them over the CT folders and the MR folders (a folder is MR when
its name says "mr"). This is the ceiling of any verifier's detection at that seed threshold,
and the baseline a change to the seeds is read against, at matched false candidates
(docs/benchmarks.md, "A per-place healthy reference for the seeds"). Shift 0 holds the
package's own candidates.

FOLDER: `diffugts phantom --no-dicom` output. Development seeds only: never tune on evaluation seeds.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from diffugts.models.package import open_package
from diffugts.stages.lesions import CONNECTIVITY_26, DEFAULT_MIN_VOLUME_ML

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, however it is run
from verifier_proxy import folder_cases, maker  # noqa: E402


def touched(mask: np.ndarray, lesions: np.ndarray, ids: list[int], min_voxels: int) -> tuple[set[int], int]:
    """(lesion ids that a component of ``mask`` of at least ``min_voxels`` touches, how many
    such components touch none of them)."""
    labels, n = ndimage.label(mask, structure=CONNECTIVITY_26)
    size = np.bincount(labels.ravel(), minlength=n + 1)
    found, false = set(), 0
    for i in np.nonzero(size >= min_voxels)[0]:
        if i == 0:
            continue
        hit = {int(v) for v in np.unique(lesions[labels == i]) if int(v) in ids}
        found |= hit
        false += not hit
    return found, false


def curve(make, folders: list[Path], shifts: list[float]) -> dict[float, dict[str, list[int]]]:
    """Per shift, per folder: [lesions touched, lesions, false candidates, lesion-free studies]."""
    model = make.normative
    spacing = tuple(make.prep.spacing_mm)[::-1]
    min_voxels = int(np.ceil(DEFAULT_MIN_VOLUME_ML / (float(np.prod(make.prep.spacing_mm)) / 1000) - 1e-9))
    out: dict[float, dict[str, list[int]]] = {s: defaultdict(lambda: [0, 0, 0, 0]) for s in shifts}
    for group, path, case, healthy, targets in folder_cases(make, folders):
        for s in shifts:
            out[s][group][3] += healthy
        for ids, ex in targets:
            for s in shifts:
                cell = out[s][group]
                cell[1] += len(ids)
                if ex is None or ex.findings is None:
                    continue
                found, false = touched(model.reseeded(ex.findings, spacing, s), case.lesions, ids, min_voxels)
                cell[0] += len(found)
                cell[2] += false
        print(f"{group}/{path.name}", flush=True)
    return out


def table(results: dict[float, dict[str, list[int]]]) -> str:
    groups = sorted({g for r in results.values() for g in r})
    kinds = {"CT": [g for g in groups if "mr" not in g.lower()], "MR": [g for g in groups if "mr" in g.lower()]}
    head = groups + [f"{m} lesions, false per lesion-free study" for m in kinds if kinds[m]]
    lines = ["| seed shift | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for shift, r in results.items():
        cells = [f"{r[g][2] / r[g][3]:.2f} per study" if r[g][3] else f"{r[g][0]}/{r[g][1]}" for g in groups]
        for gs in (gs for gs in kinds.values() if gs):
            found, total = sum(r[g][0] for g in gs if not r[g][3]), sum(r[g][1] for g in gs if not r[g][3])
            false, studies = sum(r[g][2] for g in gs if r[g][3]), sum(r[g][3] for g in gs)
            cells.append(f"{found}/{total}, {false / studies:.2f}" if studies else f"{found}/{total}, -")
        lines.append(f"| {shift:+.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the example maker's seed (the draw's)")
    parser.add_argument("--shifts", default="-0.4,-0.2,0,0.2,0.4,0.6", help="seed thresholds, relative scale")
    args = parser.parse_args(argv)
    shifts = [float(v) for v in args.shifts.split(",")]
    print(table(curve(maker(open_package(args.model), args.seed), args.folders, shifts)))


if __name__ == "__main__":
    main()
