"""An offline proxy of `diffugts evaluate` for the lesion verifier of normative candidates: fit
verifier variants and read their effect on development cases in minutes, not hours.

    python benchmarks/verifier_proxy.py MODEL FOLDER [FOLDER ...] [--seed S]
        [--fit SEEN,HEALTHY,MR_HEALTHY,ANOMALIES,MR_ANOMALIES ...] [--features A,B ...] [--min-recall R]
        [--curve] [--cache DIR] [--lookalike-cases N]

Each case is made as the verifier's fitting examples are (diffugts.train.run.verifier_examples):
the organ network, the coarse maps and the package's normative candidates on the model grid,
with every verifier feature, but without synthesis (no weighed feature of a normative verifier
reads the residual; ``refinement_example(synthesize=False)``), about 10 s a case on one core
instead of 25. Lesion cases are prompted for their lesion-bearing organs, lesion-free ones for
every host organ, as `evaluate` prompts them. Rows: every candidate kept (unverified), the
package's own verifier as shipped (``lookalikes`` read from the atlas it carries, whatever
``--lookalike-cases`` makes), and one verifier per ``--features`` set, fitted as `train verifier`
fits it (its fitting cases: ``--fit``, the seed's refinement range). Cells per folder: mean
Dice over case-organs, lesions touched, and false lesions per lesion-free study. Each kept
candidate counts as the package reports it: delineated by level where its normative model asks
(diffugts.stages.delineation; each candidate on its own, as the pipeline delineates it), else
as cut. On dev2 (docs/benchmarks.md) it gave `evaluate`'s figures to the third decimal for
both draws of the shipped recipe, as cut and delineated. ``--curve`` adds, per verifier, what it keeps at
every threshold from 0.05 to 0.95 (lesions touched over all lesion folders, false lesions per
lesion-free study over all lesion-free ones): whether a feature moves the trade-off between the
two or only the point on it. ``--cache DIR`` keeps the candidates and the fitting samples as JSON,
keyed by the package, the folders, the seed, the fitting cases and the known features, so that a
second run with other features or thresholds takes seconds. ``--lookalike-cases N`` builds the
look-alike atlas as `train verifier --lookalike-cases N` does (the seed's refinement range),
so that verifiers weighing ``lookalikes`` can be fitted.

FOLDER: `diffugts phantom --no-dicom` output. Development seeds only: never tune on evaluation seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from diffugts.models.package import ModelPackage, open_package
from diffugts.stages.lesions import DEFAULT_MIN_VOLUME_ML
from diffugts.stages.lookalikes import lookalikes_for, places
from diffugts.stages.normative import normative_of
from diffugts.stages.verification import KNOWN_FEATURES, LesionVerifier, candidates, checked_features, verifier_of
from diffugts.train.aova import organ_family
from diffugts.train.data import case_from_dir
from diffugts.train.refine import HOST_FAMILIES
from diffugts.train.run import _ExampleMaker, lookalike_atlas, verifier_examples, verifier_plan
from diffugts.train.verify import component_samples, example_evidence, fit_verifier
from diffugts.utils.atomic import write_text


def maker(pkg: ModelPackage, seed: int) -> _ExampleMaker:
    normative = normative_of(pkg)
    if normative is None:
        raise SystemExit(f"{pkg.root}: the proxy needs a package with a normative model")
    return _ExampleMaker(pkg, seed, 10, None, normative=normative, synthesize=False)


def fitting_samples(
    make: _ExampleMaker, seed: int, counts: list[int], atlas: dict | None = None
) -> tuple[list[dict], int]:
    """Every candidate of the verifier's fitting cases with every feature, and their true voxels
    (``lookalikes`` read from ``atlas``; without one, the feature is left at its empty value)."""
    samples, truth = [], 0
    spacing = tuple(make.prep.spacing_mm)[::-1]
    voxel_ml = float(np.prod(make.prep.spacing_mm)) / 1000
    for _, examples in verifier_examples(make, seed, verifier_plan(*counts)):
        zero = [np.zeros(e.truth.shape, np.float32) for e in examples]  # no head: its features are unused
        samples += component_samples(
            examples, zero, 0.5, voxel_ml, DEFAULT_MIN_VOLUME_ML, "normative", 2.0, KNOWN_FEATURES, spacing, atlas or {}
        )
        truth += sum(int(e.truth.sum()) for e in examples)
    return samples, truth


def folder_cases(make: _ExampleMaker, folders: list[Path]):
    """Per case of the folders: (folder's group, case folder, case, lesion-free?, targets), a
    target per case-organ as `evaluate` prompts them (lesion-bearing organs, or every host
    organ of a lesion-free study): (its lesions' ids, its example or None)."""
    for folder in folders:
        group = f"{folder.parent.name}/{folder.name}"
        for path in sorted(p for p in folder.iterdir() if (p / "case.json").exists()):
            case = case_from_dir(path, make.prep, keep_volume=True)
            families = sorted({organ_family(r["organ"]) for r in case.records})
            examples = make.examples(case)  # lesion families first, in this order; then lesion-free ones
            targets = [
                (
                    [r["id"] for r in case.records if organ_family(r["organ"]) == family],
                    examples[k] if k < len(examples) else None,
                )
                for k, family in enumerate(families or HOST_FAMILIES)
            ]
            yield group, path, case, not families, targets


def folder_candidates(
    make: _ExampleMaker, folders: list[Path], atlas: dict | None = None
) -> tuple[list[dict], list[dict], dict]:
    """(candidates, case-organs, lesion-free studies per folder) of the folders' cases."""
    spacing = tuple(make.prep.spacing_mm)[::-1]
    voxel_ml = float(np.prod(make.prep.spacing_mm)) / 1000
    rows: list[dict] = []
    targets: list[dict] = []
    healthy_studies: dict[str, int] = defaultdict(int)
    for group, path, case, healthy, case_targets in folder_cases(make, folders):
        healthy_studies[group] += healthy
        for ids, ex in case_targets:
            t = len(targets)
            targets.append({"group": group, "healthy": healthy, "lesions": ids, "truth": 0})
            if ex is None or ex.normative is None:
                continue
            targets[t]["truth"] = int(ex.truth.sum())
            evidence = example_evidence(ex, np.zeros(ex.truth.shape, np.float32), spacing, atlas or {})
            labels, cids, feats = candidates(ex.normative, evidence, voxel_ml, DEFAULT_MIN_VOLUME_ML, KNOWN_FEATURES)
            by_level = ex.findings.level_delineation if ex.findings is not None else None
            where = places(labels, list(cids), np.asarray(evidence.organ) > 0.5)
            for i, f, place in zip(cids, feats, where):
                m = labels == i
                if by_level is not None:  # reported as the package reports it, one candidate at a time
                    m = by_level(m, np.asarray(evidence.organ) > 0.5, ex.findings.score, spacing)
                touched = {int(v) for v in np.unique(case.lesions[m]) if int(v) in ids}
                rows.append(
                    {
                        "features": f,
                        "target": t,
                        "voxels": int(m.sum()),
                        "hits": int((m & ex.truth).sum()),
                        "touched": touched,
                        "place": place.tolist(),  # so that each verifier's own atlas can be read
                        "key": ex.findings.key if ex.findings is not None else None,
                    }
                )
        print(f"{group}/{path.name}: {len(rows)} candidates so far", flush=True)
    return rows, targets, healthy_studies


def verifier_features(rows: list[dict], verifier: LesionVerifier) -> np.ndarray:
    """(N, F): the rows' features that ``verifier`` weighs, ``lookalikes`` read from the atlas
    the verifier carries (a package's as shipped, whatever atlas the proxy made)."""
    columns = [KNOWN_FEATURES.index(f) for f in verifier.features]
    x = np.stack([np.asarray(r["features"], np.float64)[columns] for r in rows])
    if "lookalikes" in verifier.features and verifier.lookalikes is not None:
        at = verifier.features.index("lookalikes")
        for k in {r["key"] for r in rows}:
            mine = [n for n, r in enumerate(rows) if r["key"] == k]
            x[mine, at] = lookalikes_for(verifier.lookalikes, k).feature(np.asarray([rows[n]["place"] for n in mine]))
    return x


def proxy(rows: list[dict], targets: list[dict], healthy_studies: dict, verifier: LesionVerifier | None) -> dict:
    """Per folder: (Dice, lesions touched, lesions) or false lesions per lesion-free study."""
    kept: dict[int, list[dict]] = defaultdict(list)
    keep = np.ones(len(rows), bool)
    if verifier is not None and rows:
        keep = verifier.scores(verifier_features(rows, verifier)) >= verifier.threshold
    for r, k in zip(rows, keep):
        if k:
            kept[r["target"]].append(r)
    out = {}
    for group in sorted({t["group"] for t in targets}):
        ts = [(i, t) for i, t in enumerate(targets) if t["group"] == group]
        if healthy_studies[group]:
            out[group] = sum(len(kept[i]) for i, _ in ts) / healthy_studies[group]
            continue
        dice, found, total = [], 0, 0
        for i, t in ts:
            predicted, hits = sum(r["voxels"] for r in kept[i]), sum(r["hits"] for r in kept[i])
            dice.append(2 * hits / max(predicted + t["truth"], 1))
            found += len(set().union(*(r["touched"] for r in kept[i])))
            total += len(t["lesions"])
        out[group] = (float(np.mean(dice)), found, total)
    return out


CURVE_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))


def curve(rows: list[dict], targets: list[dict], healthy_studies: dict, verifier: LesionVerifier) -> list[tuple]:
    """Per threshold of CURVE_THRESHOLDS: (threshold, lesions touched, lesions, false lesions
    per lesion-free study), over all folders of each kind."""
    out, studies = [], sum(healthy_studies.values())
    for t in CURVE_THRESHOLDS:
        cells = proxy(rows, targets, healthy_studies, dataclasses.replace(verifier, threshold=t))
        lesions = [c for c in cells.values() if isinstance(c, tuple)]
        false = sum(c * healthy_studies[g] for g, c in cells.items() if not isinstance(c, tuple))
        out.append((t, sum(c[1] for c in lesions), sum(c[2] for c in lesions), false / max(studies, 1)))
    return out


def table(results: dict[str, dict]) -> str:
    groups = sorted({g for r in results.values() for g in r})
    lines = ["| verifier | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for name, r in results.items():
        cells = [
            f"{r[g]:.2f} per study" if not isinstance(r[g], tuple) else f"{r[g][0]:.3f}, {r[g][1]}/{r[g][2]}"
            for g in groups
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cached(cache: Path | None, key: list, make, *args):
    """``make(*args)``, or its result kept as JSON in ``cache`` under a hash of ``key`` (sets are
    kept as sorted lists and read back as sets; feature vectors as lists)."""
    if cache is None:
        return make(*args)
    path = cache / (hashlib.sha256(json.dumps([*key, KNOWN_FEATURES], default=str).encode()).hexdigest()[:16] + ".json")
    if path.exists():
        value = json.loads(path.read_text())
    else:
        text = json.dumps(make(*args), default=lambda v: sorted(v) if isinstance(v, set) else np.asarray(v).tolist())
        write_text(path, text)
        value = json.loads(text)  # as a later run reads it
    for row in value[0]:
        if "touched" in row:
            row["touched"] = set(row["touched"])
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the verifier fits' seed (the draw's)")
    parser.add_argument(
        "--fit",
        action="append",
        default=[],
        help="fitting cases: seen, healthy, MR healthy, anomalies, MR anomalies (repeatable; default 36,14,0,0,0)",
    )
    parser.add_argument("--features", action="append", default=[], help="a verifier to fit: comma-separated features")
    parser.add_argument("--min-recall", type=float, default=0.9)
    parser.add_argument("--curve", action="store_true", help="also each verifier's keeps at every threshold")
    parser.add_argument("--cache", type=Path, help="keep candidates and fitting samples here between runs")
    parser.add_argument(
        "--lookalike-cases",
        type=int,
        default=0,
        help="lesion-free CT and as many MR cases for the look-alike atlas that lookalikes reads (default 0: none)",
    )
    args = parser.parse_args(argv)
    fits = args.fit or ["36,14,0,0,0"]
    pkg = open_package(args.model)
    make = maker(pkg, args.seed)
    results: dict[str, dict] = {}
    fitted = {}
    atlas = None
    if args.lookalike_cases:  # kept as the verifier carries it; cached beside the candidates
        key = ["lookalikes", pkg.sha256, args.lookalike_cases]
        atlas = cached(args.cache, key, lambda: ([], lookalike_atlas(make, args.lookalike_cases)))[1]
    for fit in fits if args.features else []:
        counts = [int(v) for v in fit.split(",")]
        key = ["fit", pkg.sha256, args.seed, counts, args.lookalike_cases]
        fitted[fit] = cached(args.cache, key, fitting_samples, make, args.seed, counts, atlas)
    key = ["candidates", "places", pkg.sha256, [str(f.resolve()) for f in args.folders], args.lookalike_cases]
    rows, targets, healthy = cached(args.cache, key, folder_candidates, make, args.folders, atlas)
    healthy = defaultdict(int, healthy)
    results["none (every candidate)"] = proxy(rows, targets, healthy, None)
    verifiers = {}
    own = verifier_of(pkg)
    if own is not None and own.candidate_source == "normative":
        verifiers[f"the package's ({pkg.sha256[:12]})"] = own
    for fit, (samples, truth) in fitted.items():
        for names in args.features:
            features = checked_features(n.strip() for n in names.split(","))
            columns = [KNOWN_FEATURES.index(f) for f in features]
            picked = [{**s, "features": np.asarray(s["features"])[columns]} for s in samples]
            verifier, _ = fit_verifier(picked, truth, "normative", 2.0, features, args.min_recall)
            verifier = dataclasses.replace(verifier, lookalikes=atlas)  # as `train verifier` ships it
            verifiers[f"{','.join(features)} (fit {fit}, threshold {verifier.threshold:.2f})"] = verifier
    for name, verifier in verifiers.items():
        results[name] = proxy(rows, targets, healthy, verifier)
    print(table(results))
    if args.curve:
        print("\nlesions touched / false lesions per lesion-free study, by threshold:")
        for name, verifier in verifiers.items():
            points = " ".join(f"{t:.2f}: {f}/{n} {fp:.2f}" for t, f, n, fp in curve(rows, targets, healthy, verifier))
            print(f"- {name}: {points}")


if __name__ == "__main__":
    main()
