"""`diffugts evaluate`: Dice and NSD on phantom cases with exact ground truth, or on real
datasets (diffugts.datasets: the same per-case code, rows grouped per dataset as well).

For every case and every organ that carries lesions, the prompt "<organ> tumor" (or the
user's template) is segmented by four variants of the method:

- ``baseline``: an intensity-outlier detector that knows nothing of the method (voxels of
  the body whose soft-tissue intensity departs from a smoothed local background);
- ``aova``: the coarse attention mask alone;
- ``residual``: coarse mask -> pseudo-healthy synthesis -> |x - H| above a threshold inside
  the target's own dilated coarse mask, no trained head;
- ``full``: the refined mask (residual refinement head) inside that same region and the body,
  the product's output;
- ``organ_zscore``: the organ-aware baseline, |z| of the
  organ-relative deviation above ``ZSCORE_K`` in the organ the model's own region map found
  (diffugts.stages.deviation); no learned weight beyond the region map;
- ``normative`` (packages with a normative model): every candidate of the normative model
  in the same organ, unverified: the label-free part of the method alone, what the lesion
  verifier then keeps or drops (diffugts.stages.normative);
- ``training_free`` (2D diffusers packages only, beside the four): the backbone's own
  cross-attention map (``diffugts attend --maps training-free``) at the package's
  training-free threshold; no trained weight beyond the backbone.

Scores are grouped by modality and seen / unseen (the headline groups: CT seen types, CT
unseen types, MR), by lesion type, by organ, with Dice and normalised surface Dice (MONAI
metrics), a lesion-level detection rate (a lesion the prediction touches; beside it, one with at
least DETECTION_MIN_OVERLAP of its voxels predicted) and false lesions (predicted lesions of at
least the reported minimum volume touching no true lesion), and where the Dice goes (``dice_budget``: the
Dice without the false lesions, and with the found lesions delineated exactly: what false lesions,
delineation and missed lesions each cost). Lesion-free cases are prompted for every
host organ and give the false lesions per healthy study. The ``full`` variant is scored as
the lesion artifact reports it (components under the minimum volume dropped).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from diffugts.artifacts.geometry import Geometry
from diffugts.config import MapMode
from diffugts.errors import InputError
from diffugts.utils import atomic
from diffugts.utils.progress import progress

log = logging.getLogger(__name__)

VARIANTS = ("baseline", "aova", "residual", "full")
ALL_VARIANTS = VARIANTS + ("organ_zscore", "normative", "training_free")  # the column order of the tables
NSD_TOLERANCE_MM = 2.0
RESIDUAL_THRESHOLD_HU = 40.0  # the "no head" variant; a lesion departs from its organ by >= 18 HU
# The organ-aware baseline: |z| of the organ-relative deviation (the model's own organ map)
# above this; 2 was the best of 2 / 3 / 4 on the development seen types with true organs.
ZSCORE_K = 2.0
# Lesion-free cases are prompted for every organ a lesion can lie in.
HEALTHY_PROMPT_ORGANS = ("kidney", "liver", "pancreas", "spleen")


@dataclass
class Case:
    case_id: str
    root: Path
    meta: dict
    volume: np.ndarray
    geometry: Geometry
    lesions: np.ndarray

    @property
    def modality(self) -> str:
        return self.meta["modality"]


def load_cases(root: str | Path) -> list[Case]:
    root = Path(root)
    # Any depth, so one folder can hold several sets (e.g. ct-unseen/, ct-seen/, mr/).
    dirs = sorted(p.parent for p in root.rglob("case.json"))
    if not dirs:
        raise InputError(root, "no phantom cases (folders with case.json; make them with `diffugts phantom`)")
    cases = []
    for d in dirs:
        meta = json.loads((d / "case.json").read_text())
        image = sitk.ReadImage(str(d / meta["files"]["volume"]))
        lesions = sitk.GetArrayFromImage(sitk.ReadImage(str(d / meta["files"]["lesions"])))
        cases.append(
            Case(
                meta["case_id"],
                d,
                meta,
                sitk.GetArrayFromImage(image).astype(np.float32),
                Geometry.from_sitk(image),
                lesions,
            )
        )
    return cases


def family(organ: str) -> str:
    return organ.replace("left ", "").replace("right ", "")


def intensity_baseline(volume: np.ndarray, geometry: Geometry, modality: str, k: float = 3.0) -> np.ndarray:
    """Voxels of the body that depart from their smoothed surroundings by k robust SDs.

    Soft tissue only (CT: -100..300 HU; MR: the middle of the intensity distribution), so
    air, fat and bone edges do not dominate. No organ or text knowledge.
    """
    from diffugts.stages.refine import body_mask

    body = body_mask(volume, modality)
    if modality == "CT":
        soft = (volume > -100) & (volume < 300)
    else:
        lo, hi = np.percentile(volume[body], [20, 95])
        soft = (volume > lo) & (volume < hi)
    region = body & soft
    # Background = soft-tissue-only smoothing (normalised convolution), so air, fat and bone
    # next to an organ do not pull its background down or up.
    sigma_vox = 10.0 / np.asarray(geometry.spacing)[::-1]  # ~10 mm background scale
    weight = ndimage.gaussian_filter(region.astype(np.float32), sigma_vox)
    background = ndimage.gaussian_filter(np.where(region, volume, 0).astype(np.float32), sigma_vox)
    residual = volume - background / np.maximum(weight, 1e-3)
    med = np.median(residual[region])
    mad = np.median(np.abs(residual[region] - med)) * 1.4826 + 1e-6
    mask = region & (np.abs(residual - med) > k * mad)
    return ndimage.binary_opening(mask, iterations=1)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denom = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / denom) if denom else 1.0


def nsd(pred: np.ndarray, truth: np.ndarray, spacing_kji, tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    from monai.metrics import compute_surface_dice

    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    p = torch.from_numpy(np.stack([~pred, pred]))[None].float()
    t = torch.from_numpy(np.stack([~truth, truth]))[None].float()
    value = compute_surface_dice(
        p, t, class_thresholds=[tolerance_mm], include_background=False, spacing=tuple(float(s) for s in spacing_kji)
    )
    return float(value[0, 0])


# A lesion counts as detected when the prediction touches it; a candidate that grew past its
# lesion (or beside it) touches small foci with its edge, so detection is also reported with at
# least this share of the lesion's voxels predicted ("detection_overlap").
DETECTION_MIN_OVERLAP = 0.1


def lesion_overlap(pred: np.ndarray, lesion_map: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """Per lesion id: (voxels the prediction covers, the lesion's voxels), in one pass each."""
    index = np.asarray(ids, int)
    covered = ndimage.sum_labels(np.asarray(pred, bool), lesion_map, index)
    size = ndimage.sum_labels(np.ones(lesion_map.shape, bool), lesion_map, index)
    return np.asarray(covered), np.asarray(size)


def dice_budget(pred: np.ndarray, truth: np.ndarray, covered: np.ndarray, size: np.ndarray) -> tuple[float, float]:
    """Where a row's Dice goes: (its Dice with the predicted components that touch no true
    lesion removed, the Dice it would have if every lesion the prediction touches were
    delineated exactly and nothing else predicted). Their gaps to the Dice as reported are
    what false lesions and delineation cost; the gap of the second to 1, the missed lesions.
    ``covered``/``size``: :func:`lesion_overlap` of the row's lesions."""
    from diffugts.stages.lesions import CONNECTIVITY_26

    labels, _ = ndimage.label(np.asarray(pred, bool), structure=CONNECTIVITY_26)
    touching = np.unique(labels[truth & (labels > 0)])
    found = float(np.asarray(size)[np.asarray(covered) > 0].sum())
    total = float(np.asarray(size).sum())
    return dice(np.isin(labels, touching), truth), (2 * found / (found + total) if total else 1.0)


def detected(covered: np.ndarray, size: np.ndarray, min_overlap: float = 0.0) -> int:
    """Lesions the prediction touches (``min_overlap`` 0), or covers at least that share of."""
    return int(np.count_nonzero((covered > 0) & (covered >= min_overlap * size)))


def detection(pred: np.ndarray, lesion_map: np.ndarray, ids, min_overlap: float = 0.0) -> tuple[int, int]:
    """(detected, total) lesions: a lesion is detected when the prediction touches it
    (``min_overlap`` 0), or covers at least that share of its voxels."""
    return detected(*lesion_overlap(pred, lesion_map, ids), min_overlap), len(ids)


def evaluate(
    cases_dir,
    model: str,
    *,
    prompt_template: str = "{organ} tumor",
    device: str | None = None,
    variants=None,
    show_progress: bool = True,
    cases=None,
    datasets: list[dict] | None = None,
    verifier_threshold: float | None = None,
) -> dict:
    """``variants`` None: the four and ``organ_zscore``, plus ``normative`` for a package with
    a normative model and ``training_free`` for a 2D diffusers package. Lesion-free cases are
    prompted for every host organ and give the false-lesion rate per healthy study.
    ``verifier_threshold``: the full method's lesion verifier operating point (None: the
    package's), recorded in the result.

    ``cases``: instead of ``cases_dir``, a sized iterable of :class:`Case` (real datasets:
    :meth:`diffugts.datasets.Dataset.eval_cases`, read one at a time); rows then carry each
    case's ``dataset`` and ``datasets`` (their provenance) goes into the result."""
    from diffugts.artifacts.study import Study
    from diffugts.config import MethodParams, RefineParams, SynthesisParams
    from diffugts.core import Core
    from diffugts.networks.text import make_target
    from diffugts.stages.attend import default_threshold, training_free_maps
    from diffugts.stages.lesions import split_instances
    from diffugts.stages.normative import normative_of
    from diffugts.stages.preprocess import intensity_range
    from diffugts.stages.refine import target_region

    cases = load_cases(cases_dir) if cases is None else cases
    core = Core(model, device, MethodParams(refine=RefineParams(verifier_threshold=verifier_threshold))).load()
    threshold = default_threshold(core.package, MapMode.AOVA)
    normative = normative_of(core.package)
    if variants is None:
        variants = (
            VARIANTS
            + ("organ_zscore",)
            + (("normative",) if normative else ())
            + (("training_free",) if core.backbone.family == "diffusers2d" else ())
        )
    free_threshold = default_threshold(core.package, MapMode.TRAINING_FREE)
    dilation_mm = SynthesisParams().dilation_mm
    rows, healthy_rows = [], []
    for case in progress(cases, desc="evaluate", unit="case", enable=show_progress):
        by_family: dict[str, list[dict]] = defaultdict(list)
        for rec in case.meta["lesions"]:
            by_family[family(rec["organ"])].append(rec)
        organs = sorted(by_family) or list(HEALTHY_PROMPT_ORGANS)
        targets = [make_target(prompt_template.format(organ=o), organ=o) for o in organs]
        # The product's own stages, in memory (diffugts.core): the rows score what it outputs.
        study = core.prepare(Study(case.root, {"modality": case.modality}, case.volume, case.geometry))
        attention = core.attend(study, targets)
        synthesis = core.synthesize(study, attention)
        lesions = core.refine(study, attention, synthesis)
        coarse, maps, pseudo = attention.maps, attention.coarse, synthesis.pseudo_healthy
        assert maps is not None and maps.z is not None and maps.organ is not None  # AOVA maps carry their organ
        x, space = study.model_grid
        lo, hi = intensity_range(case.volume, case.modality, core.prep)
        baseline = intensity_baseline(case.volume, case.geometry, case.modality) if "baseline" in variants else None
        residual_hu = RESIDUAL_THRESHOLD_HU if case.modality == "CT" else RESIDUAL_THRESHOLD_HU / 600 * (hi - lo)
        free: np.ndarray | None
        free_scores: np.ndarray | None
        free, free_scores = training_free_maps(core.method, x, targets) if "training_free" in variants else (None, None)
        owns = [target_region(c >= threshold, case.geometry, dilation_mm) for c in coarse]
        grounding = normative.seed_maps(core.organ_net, x) if normative is not None and "normative" in variants else {}
        # As the lesion artifact reports them: components below the minimum volume dropped.
        full = [split_instances(m, case.geometry) > 0 for m in lesions.masks]
        for n, organ in enumerate(organs):
            preds = {
                "baseline": baseline,
                "aova": coarse[n] >= threshold,
                "residual": (np.abs(case.volume - pseudo) > residual_hu) & owns[n],
                "full": full[n],
            }
            if "organ_zscore" in variants:
                z = np.abs(maps.z[n]) > ZSCORE_K
                preds["organ_zscore"] = ndimage.binary_opening(space.to_study(z.astype(np.float32)) >= 0.5)
            if normative is not None and "normative" in variants:
                spacing_kji = tuple(space.model.spacing)[::-1]  # none where the model has no mixture
                found_here = normative.candidates(
                    x, maps.organ[n], organ, case.modality, spacing_kji, grounding.get(organ)
                )
                preds["normative"] = space.to_study(found_here.astype(np.float32)) >= 0.5
            if free is not None:
                preds["training_free"] = np.clip(space.to_study(free[n]), 0, 1) >= free_threshold
            recs = by_family.get(organ, [])
            ids = [r["id"] for r in recs]
            truth = np.isin(case.lesions, ids)
            for variant in variants:
                pred = preds[variant]
                false, false_ml = false_components(pred, truth, case.geometry)
                source = {"dataset": case.meta["dataset"]} if "dataset" in case.meta else {}
                if not recs:
                    healthy_rows.append(
                        {
                            "case": case.case_id,
                            "modality": case.modality,
                            "organ": organ,
                            "variant": variant,
                            "false_lesions": false,
                            "false_volume_ml": round(false_ml, 3),
                            **source,
                        }
                    )
                    continue
                covered, size = lesion_overlap(pred, case.lesions, ids)
                found, overlapping, total = (
                    detected(covered, size),
                    detected(covered, size, DETECTION_MIN_OVERLAP),
                    len(ids),
                )
                largest = max(recs, key=lambda r: r["voxels"])
                without_false, found_exact = dice_budget(pred, truth, covered, size)
                rows.append(
                    {
                        "case": case.case_id,
                        "modality": case.modality,
                        "organ": organ,
                        "variant": variant,
                        "lesion_type": largest["type"],
                        "types": sorted({r["type"] for r in recs}),
                        "split": "seen" if all(r["split"] == "seen" for r in recs) else "unseen",
                        "dice": dice(pred, truth),
                        "dice_without_false": round(without_false, 4),
                        "dice_found_exact": round(found_exact, 4),
                        "nsd": nsd(pred, truth, case.geometry.spacing[::-1]),
                        "detected": found,
                        "detected_overlap": overlapping,
                        "lesions": total,
                        "false_lesions": false,
                        "score": float(
                            (free_scores if variant == "training_free" and free_scores is not None else maps.score)[n]
                        ),
                        **source,
                    }
                )
    result = {
        "model": {"name": core.package.name, "sha256": core.package.sha256},
        **({"verifier_threshold": verifier_threshold} if verifier_threshold is not None else {}),
        "prompt_template": prompt_template,
        "cases": len(cases),
        "variants": list(variants),
        "rows": rows,
        "healthy_rows": healthy_rows,
        "summary": summarise(rows),
        "healthy": summarise_healthy(healthy_rows),
    }
    if datasets is not None:
        from diffugts.datasets.report import summarise_datasets

        result.update(datasets=datasets, **summarise_datasets(rows, healthy_rows))
    return result


def false_lesions(pred: np.ndarray, truth: np.ndarray, geometry: Geometry) -> int:
    """Predicted lesions (components of at least the reported minimum volume) that touch no
    true lesion."""
    return false_components(pred, truth, geometry)[0]


def false_components(pred: np.ndarray, truth: np.ndarray, geometry: Geometry) -> tuple[int, float]:
    """(how many, their volume in mL): the predicted lesions (components of at least the
    reported minimum volume) that touch no true lesion. A count alone hides a 50 mL false
    lesion behind a 0.1 mL one."""
    from diffugts.stages.lesions import split_instances, voxel_ml

    labels = split_instances(pred, geometry)
    hit = np.unique(labels[truth & (labels > 0)])
    false = np.setdiff1d(np.arange(1, int(labels.max()) + 1), hit)
    return len(false), float(np.isin(labels, false).sum() * voxel_ml(geometry))


def summarise_healthy(rows: list[dict], key: str = "modality") -> dict:
    """False lesions and their volume (mL) per lesion-free study (every host organ prompted),
    per modality (or ``key``) and variant."""
    table: dict[str, dict[str, dict]] = {}
    for row in rows:
        cell = table.setdefault(row[key], {}).setdefault(row["variant"], {"cases": set(), "false": 0, "ml": 0.0})
        cell["cases"].add((row.get("dataset"), row["case"]))  # case ids repeat across datasets
        cell["false"] += row["false_lesions"]
        cell["ml"] += row.get("false_volume_ml", 0.0)  # rows of results written before it: none
    return {
        m: {
            v: {
                "false_lesions_per_study": round(c["false"] / len(c["cases"]), 3),
                "false_volume_ml_per_study": round(c["ml"] / len(c["cases"]), 2),
                "studies": len(c["cases"]),
            }
            for v, c in cells.items()
        }
        for m, cells in sorted(table.items())
    }


def summarise(rows: list[dict], groups: dict[str, list[str]] | None = None) -> dict:
    groups = groups or {
        "modality_split": ["modality", "split"],
        "split": ["split"],
        "modality": ["modality"],
        "lesion_type": ["lesion_type"],
        "organ": ["organ"],
    }
    out = {}
    for name, keys in groups.items():
        table: dict[str, dict] = {}
        for row in rows:
            key = " / ".join(str(row[k]) for k in keys)
            cell = table.setdefault(key, {}).setdefault(
                row["variant"],
                {"dice": [], "nsd": [], "found": 0, "total": 0, "false": 0, "overlap": 0, "old": False, "budget": []},
            )
            cell["dice"].append(row["dice"])
            cell["nsd"].append(row["nsd"])
            cell["found"] += row["detected"]
            cell["total"] += row["lesions"]
            cell["false"] += row.get("false_lesions", 0)
            cell["overlap"] += row.get("detected_overlap", 0)
            cell["old"] |= "detected_overlap" not in row  # rows of results written before it
            if "dice_found_exact" in row:  # likewise
                cell["budget"].append((row["dice_without_false"], row["dice_found_exact"]))
        out[name] = {
            key: {
                v: {
                    "dice": round(float(np.mean(c["dice"])), 4),
                    "nsd": round(float(np.mean(c["nsd"])), 4),
                    "detection": round(c["found"] / max(c["total"], 1), 4),
                    "n": len(c["dice"]),
                    "false_lesions": round(c["false"] / len(c["dice"]), 3),
                    **({} if c["old"] else {"detection_overlap": round(c["overlap"] / max(c["total"], 1), 4)}),
                    **(
                        {
                            "dice_without_false": round(float(np.mean([b[0] for b in c["budget"]])), 4),
                            "dice_found_exact": round(float(np.mean([b[1] for b in c["budget"]])), 4),
                        }
                        if len(c["budget"]) == len(c["dice"])
                        else {}
                    ),
                }
                for v, c in variants.items()
            }
            for key, variants in sorted(table.items())
        }
    return out


def table_variants(result: dict) -> list[str]:
    """The variant columns: the result's own list, else every variant its summary has, the
    known ones in their usual order first (results of other models have other sets)."""
    if result.get("variants"):
        return list(result["variants"])
    seen = {v for table in result["summary"].values() for cells in table.values() for v in cells}
    return [v for v in ALL_VARIANTS if v in seen] + sorted(seen - set(ALL_VARIANTS))


def _group_table(table: dict, variants: list[str], needs: str, heading: list[str], cell) -> list[str]:
    """A by-group table of ``cell(cells[variant])`` per variant under ``heading``; nothing for
    results written before ``needs`` was measured."""
    if not table or any(needs not in c for cells in table.values() for c in cells.values()):
        return []
    lines = [*heading, "| group | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for key, cells in table.items():
        lines.append(f"| {key} | " + " | ".join(cell(cells[v]) if v in cells else "-" for v in variants) + " |")
    return lines + [""]


def overlap_table(table: dict, variants: list[str]) -> list[str]:
    """Detection by touch beside detection at DETECTION_MIN_OVERLAP, by modality and split
    (nothing for results written before the overlap was measured)."""
    heading = [f"### Lesion detection: touched / at least {DETECTION_MIN_OVERLAP:.0%} of the lesion predicted", ""]
    return _group_table(
        table, variants, "detection_overlap", heading, lambda c: f"{c['detection']:.2f} / {c['detection_overlap']:.2f}"
    )


def budget_table(table: dict, variants: list[str]) -> list[str]:
    """Where Dice goes, by modality and split: as reported / without the false lesions /
    with the found lesions delineated exactly (nothing for results written before it)."""
    heading = [
        "### Where Dice goes: as reported / without false lesions / found lesions delineated exactly",
        "",
        "The second figure's gain is what false lesions cost, the third's what delineation costs; "
        "the third's gap to 1, what missed lesions cost.",
        "",
    ]
    return _group_table(
        table,
        variants,
        "dice_found_exact",
        heading,
        lambda c: f"{c['dice']:.3f} / {c['dice_without_false']:.3f} / {c['dice_found_exact']:.3f}",
    )


def markdown(result: dict) -> str:
    variants = table_variants(result)
    lines = [
        f"Model `{result['model']['name']}` (sha256 {result['model']['sha256'][:12]}), "
        f'{result["cases"]} cases, prompt template "{result["prompt_template"]}"'
        + (
            f", lesion verifier at {result['verifier_threshold']} instead of the model's"
            if result.get("verifier_threshold") is not None
            else ""
        )
        + ". Cells: Dice / NSD / lesion detection / false lesions per case-organ "
        "(predicted lesions touching no true one).",
        "",
    ]
    for name, table in result["summary"].items():
        title = {"modality_split": "modality and split", "lesion_type": "lesion type"}.get(name, name)
        lines += [
            f"### By {title}",
            "",
            "| group | n | " + " | ".join(variants) + " |",
            "|---|---|" + "---|" * len(variants),
        ]
        for key, cells in table.items():
            n = next(iter(cells.values()))["n"]
            vals = [
                f"{cells[v]['dice']:.3f} / {cells[v]['nsd']:.3f} / {cells[v]['detection']:.2f} / "
                f"{cells[v].get('false_lesions', float('nan')):.2f}"
                if v in cells
                else "-"
                for v in variants
            ]
            lines.append(f"| {key} | {n} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += overlap_table(result.get("summary", {}).get("modality_split", {}), variants)
    lines += budget_table(result.get("summary", {}).get("modality_split", {}), variants)
    if result.get("healthy"):
        lines += [
            "### Lesion-free studies: false lesions / their mL per study (every host organ prompted)",
            "",
            "| modality | studies | " + " | ".join(variants) + " |",
            "|---|---|" + "---|" * len(variants),
        ]
        for modality, cells in result["healthy"].items():
            n = next(iter(cells.values()))["studies"]
            vals = [
                f"{cells[v]['false_lesions_per_study']:.2f} / {cells[v].get('false_volume_ml_per_study', 0.0):.1f}"
                if v in cells
                else "-"
                for v in variants
            ]
            lines.append(f"| {modality} | {n} | " + " | ".join(vals) + " |")
        lines.append("")
    if result.get("datasets") is not None:
        from diffugts.datasets.report import markdown_datasets

        lines += markdown_datasets(result, variants)
    return "\n".join(lines)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "evaluation.md", markdown(result))
    atomic.write_json(out / "evaluation.json", result)
