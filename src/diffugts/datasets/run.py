"""The protocol's stages as library calls, for the CLI and the Kubeflow components alike:
the training source of a split file, checkpoints of a training run, evaluation of a set of
datasets (components stay thin adapters over these)."""

from __future__ import annotations

import logging
from pathlib import Path

from diffugts.datasets import Dataset, EvalCases
from diffugts.datasets.protocol import open_protocol_datasets
from diffugts.datasets.select import evaluation_sets, protocol_of
from diffugts.datasets.training import DatasetSource

log = logging.getLogger(__name__)


def protocol_source(
    protocol: str | None,
    data_root,
    seen=None,
    held_out_fraction: float | None = None,
    show_progress: bool = True,
    max_cases: int | None = None,
) -> DatasetSource:
    """The training datasets of a split file (``None``: the paper protocol) under ``data_root``."""
    p = protocol_of(protocol, data_root)
    datasets = open_protocol_datasets(p, data_root, "train")
    if seen:
        datasets = [d.with_seen(seen) for d in datasets]
    fraction = p.held_out_fraction if held_out_fraction is None else held_out_fraction
    return DatasetSource(
        datasets,
        fraction,
        show_progress=show_progress,
        max_cases=max_cases,
        protocol={"name": p.name, "path": p.path, "sha256": p.sha256},
    )


def training_checkpoint(
    folder: str | Path, head: str, model, settings: dict, source: DatasetSource | None, every: int = 100
):
    """``folder/<head>.pt``, keyed on the model, the settings and the data (another run's
    checkpoint is not resumed)."""
    from diffugts.models.package import open_package
    from diffugts.train.checkpoint import Checkpoint

    key = {
        "head": head,
        "model_sha256": open_package(model).sha256,
        **settings,
        "datasets": source.key() if source else None,
    }
    return Checkpoint(Path(folder) / f"{head}.pt", key, every)


def trained_types(model) -> list[str]:
    """The lesion types the package's heads were trained on, as its manifest records them
    (dataset training only; [] for phantom-only packages)."""
    from diffugts.models.package import open_package

    provenance = open_package(model).manifest.get("provenance", {})
    return sorted(
        {
            t
            for key in ("aova_training", "refine_training")
            for d in (provenance.get(key, {}).get("datasets") or {}).get("datasets", [])
            for t in d.get("seen_types", [])
        }
    )


def trained_cases(model) -> dict[str, set[str]]:
    """Dataset name -> the case ids that trained the package's heads or tuned them (as its
    manifest records them)."""
    from diffugts.models.package import open_package

    provenance = open_package(model).manifest.get("provenance", {})
    out: dict[str, set[str]] = {}
    for key in ("aova_training", "refine_training"):
        for d in (provenance.get(key, {}).get("datasets") or {}).get("datasets", []):
            out.setdefault(d["name"], set()).update(d.get("training_cases", []))
    return out


def without_trained(model, sets: list[tuple[str, Dataset]]) -> tuple[list[tuple[str, Dataset]], dict[str, int]]:
    """``sets`` without the cases that trained the model, and per dataset how many were left out."""
    trained = trained_cases(model)
    kept, excluded = [], {}
    for role, d in sets:
        drop = [c for c in d.case_ids if c in trained.get(d.name, ())]
        if drop:
            log.warning("%s: %d cases trained this model; left out of the evaluation", d.root, len(drop))
            excluded[d.name] = len(drop)
            d = d.subset([c for c in d.case_ids if c not in drop])
        if len(d):
            kept.append((role, d))
    return kept, excluded


def evaluate_sets(
    model: str,
    sets: list[tuple[str, Dataset]],
    *,
    prompt_template: str = "{organ} tumor",
    device: str | None = None,
    show_progress: bool = True,
    verifier_threshold: float | None = None,
) -> dict:
    """``sets``: (role, dataset) pairs; the role ("held-out", "evaluate") goes into the result.
    Cases that trained the model (its manifest says which) are never scored: they are left
    out, and the result says how many."""
    from diffugts.runners.evaluate import evaluate

    sets, excluded = without_trained(model, sets)
    provenance = [
        {**d.provenance(), "role": role, "training_cases_left_out": excluded.get(d.name, 0)} for role, d in sets
    ]
    return evaluate(
        None,
        model,
        prompt_template=prompt_template,
        device=device,
        show_progress=show_progress,
        cases=EvalCases(*(d for _, d in sets)),
        datasets=provenance,
        verifier_threshold=verifier_threshold,
    )


def evaluate_protocol(model: str, protocol: str | None, data_root, **kw) -> dict:
    """The held-out cases of the training datasets and every case of the evaluation datasets."""
    return evaluate_sets(model, evaluation_sets(protocol_of(protocol, data_root), data_root), **kw)
