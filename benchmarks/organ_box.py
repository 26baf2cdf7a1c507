"""What cropping the organ-relative filters to the organ's box saves: the coarse stage's
deviation (organ with inclusions, interior, z) and the normative appearance features of each
organ of a CT phantom, on its box (stages.deviation.organ_box) against the whole volume, run
alternately, side by side. Both give bit-identical numbers (checked here and in the tests).

    python benchmarks/organ_box.py                  # demo grid and a 2x finer grid
    python benchmarks/organ_box.py --repeats 5

Printed: per grid and organ the median seconds of each variant and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from diffugts.models.package import open_package
from diffugts.stages import deviation, normative
from diffugts.stages.deviation import DeviationParams, organ_deviation
from diffugts.stages.normative import appearance_features
from diffugts.stages.preprocess import Preprocessing
from diffugts.train.data import phantom_case
from diffugts.train.organs import ORGANS, organ_labels
from diffugts.train.recipe import DemoRecipe

NORMATIVE = DemoRecipe().normative_params()  # the recipe's features and border (a thin organ's too)


def WHOLE(mask, spacing, reach):  # noqa: N802 - the baseline: every filter on the whole volume
    return tuple(slice(0, n) for n in mask.shape)


def per_target(x, organ_lo, spacing):
    organ, _, z = organ_deviation(x, organ_lo, spacing, DeviationParams(margin_mm=5.0))
    return organ, z, appearance_features(x, organ, spacing, NORMATIVE)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prep = Preprocessing.from_dict(open_package("demo").manifest["preprocessing"])
    case = phantom_case(7, 1, prep, split="seen")
    labels = organ_labels(case, ORGANS)
    spacing = np.asarray(prep.spacing_mm, float)[::-1]
    boxed_fn = deviation.organ_box
    grids = {"demo grid": (case.x, labels, spacing), "2x finer": (None, None, spacing / 2)}
    for name, (x, lab, sp) in grids.items():
        if x is None:  # the same anatomy on a grid twice as fine in every axis
            x = ndimage.zoom(case.x, 2, order=1)
            lab = ndimage.zoom(labels, 2, order=0)
        print(f"{name}: {x.shape}, spacing {tuple(round(float(s), 2) for s in sp)} mm")
        totals = {"box": 0.0, "whole": 0.0}
        for n, organ in enumerate(ORGANS, start=1):
            lo = np.where(lab == n, 3.0, -3.0).astype(np.float32)
            if not (lab == n).any():
                continue
            times: dict[str, list[float]] = {"box": [], "whole": []}
            outs = {}
            for _ in range(args.repeats):
                for variant in ("box", "whole"):
                    crop = boxed_fn if variant == "box" else WHOLE
                    deviation.organ_box = normative.organ_box = crop  # type: ignore[assignment]
                    seconds, outs[variant] = timed(per_target, x, lo, sp)
                    times[variant].append(seconds)
            deviation.organ_box = normative.organ_box = boxed_fn  # type: ignore[assignment]
            a, b = outs["box"], outs["whole"]
            same = all(np.array_equal(u, v) for u, v in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])))
            med = {k: statistics.median(v) for k, v in times.items()}
            for k in totals:
                totals[k] += med[k]
            print(
                f"  {organ:12s} {int((lab == n).sum()):8d} voxels  box {med['box']:6.2f} s  "
                f"whole {med['whole']:6.2f} s  x{med['whole'] / med['box']:.1f}  identical: {same}"
            )
        ratio = totals["whole"] / totals["box"]
        print(f"  all organs: box {totals['box']:.2f} s, whole {totals['whole']:.2f} s, x{ratio:.1f}")


if __name__ == "__main__":
    main()
