"""Blind sides of a package's normative scores: which organs' scorers call a flat blob far brighter
or darker than the organ healthy.

    python benchmarks/blind_sides.py MODEL [--cases N] [--seed S] [--spreads 4,10,25]

Healthy feature rows of N lesion-free phantoms per modality (development seed S, never fitted
on), with their organ-relative mean columns (every ``mean_`` feature) set to +-c organ spreads
and every other feature left as it was: per organ and modality, the share of such rows above
the scorer's seed threshold. A share below one half on a side is a blind side: a lesion of that
intensity is found by its shape and texture alone, if at all. Painted anomalies reach 6
spreads (diffugts.train.anomalies.RelativeAnomalySpec); past them a discriminator learnt only
from healthy tissue, and where an organ's healthy reference holds tissue that far out (the CT
liver's enhanced vessels, the CT kidney's sinus fat, the MR liver's vessels) it calls that
side healthy (docs/benchmarks.md, "Either where the discriminator extrapolates").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from diffugts.models.package import open_package
from diffugts.stages.normative import normative_of

MODALITIES = ("CT", "MR")
DEFAULT_SPREADS = (4.0, 6.0, 10.0, 15.0, 25.0, 40.0)


def flat_blob_shares(scorer, rows: np.ndarray, features: Sequence[str], spreads: Sequence[float]) -> dict[float, float]:
    """Per signed spread c: the share of ``rows`` with every ``mean_`` column set to c that
    ``scorer`` scores above its seed threshold (``high``)."""
    means = [i for i, name in enumerate(features) if name.startswith("mean_")]
    if not means:
        raise ValueError("the features hold no organ-relative mean: nothing to probe")
    out = {}
    for c in spreads:
        for signed in (float(c), -float(c)):
            probe = np.array(rows, np.float32, copy=True)
            probe[:, means] = signed
            out[signed] = float(np.mean(scorer.score(probe) > scorer.high)) if len(probe) else float("nan")
    return out


def table(shares: dict[str, dict[float, float]], spreads: Sequence[float]) -> str:
    """Markdown: one row per organ and modality, brighter then darker; blind cells in bold."""
    cell = lambda v: f"**{v:.2f}**" if v < 0.5 else f"{v:.2f}"  # noqa: E731
    head = [f"+{c:g}" for c in spreads] + [f"-{c:g}" for c in spreads]
    lines = ["| organ, modality | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for k, s in sorted(shares.items()):
        values = [s[float(c)] for c in spreads] + [s[-float(c)] for c in spreads]
        lines.append(f"| {k} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def healthy_rows(pkg, model, modality: str, cases: int, seed: int) -> dict[str, np.ndarray]:
    """Per key the healthy feature rows of ``cases`` lesion-free phantoms, as training samples them."""
    from diffugts.networks.organs import load_organ_net
    from diffugts.stages.attend import deviation_of
    from diffugts.stages.preprocess import Preprocessing
    from diffugts.train.data import phantom_case
    from diffugts.train.normative import normative_samples

    prep = Preprocessing.from_dict(pkg.manifest["preprocessing"])
    spacing = tuple(prep.spacing_mm)[::-1]
    phantoms = [phantom_case(seed, i, prep, healthy=True, modality=modality) for i in range(cases)]
    return normative_samples(phantoms, load_organ_net(pkg), spacing, model.params, deviation_of(pkg))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--cases", type=int, default=6, help="lesion-free phantoms per modality (default %(default)s)")
    parser.add_argument("--seed", type=int, default=5140, help="their (development) seed (default %(default)s)")
    parser.add_argument(
        "--spreads", default=",".join(f"{c:g}" for c in DEFAULT_SPREADS), help="organ spreads, comma-separated"
    )
    args = parser.parse_args(argv)
    spreads = [float(v) for v in args.spreads.split(",")]
    pkg = open_package(args.model)
    model = normative_of(pkg)
    if model is None:
        raise SystemExit(f"{pkg.root}: no normative model to probe")
    shares = {}
    for modality in MODALITIES:
        rows = healthy_rows(pkg, model, modality, args.cases, args.seed)
        for k, scorer in model.scorers.items():
            if k.endswith("/" + modality) and k in rows:
                shares[k] = flat_blob_shares(scorer, rows[k][::4], model.params.features, spreads)
    print(f"{pkg.root} ({pkg.sha256[:12]}), {model.params.score} score: share of flat blobs above the seed threshold")
    print(table(shares, spreads))


if __name__ == "__main__":
    main()
