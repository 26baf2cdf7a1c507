"""Datasets as a source of training cases for the heads (`diffugts train aova|refine
--dataset ...`).

Each dataset is split by the protocol's hash rule (:func:`diffugts.datasets.protocol.split_cases`)
into training cases and held-out cases (the heads' validation, as the phantom recipe holds
out a few cases). Only the zero-shot protocol's share reaches training: a case with a lesion
of a type not marked seen is skipped, and recorded as skipped. Cases are read one at a time
and kept on the model grid only (what the training loops hold anyway).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from diffugts.datasets import Dataset, to_training_case
from diffugts.datasets.protocol import rank
from diffugts.datasets.select import training_sets
from diffugts.errors import InputError
from diffugts.utils.progress import progress


class DatasetSource:
    def __init__(
        self,
        datasets: list[Dataset],
        held_out_fraction: float = 0.2,
        show_progress: bool = True,
        protocol: dict | None = None,
        max_cases: int | None = None,
    ):
        """``max_cases``: at most this many training cases per dataset (the training loops hold
        every case's features / examples in memory; see docs/datasets.md), chosen by the same
        hash as the held-out split, so a larger cap only adds cases."""
        self.datasets = datasets
        self.held_out_fraction = held_out_fraction
        self.max_cases = max_cases or None
        self.train, self.held = training_sets(datasets, held_out_fraction)
        if self.max_cases:
            self.train = [
                d.subset(sorted(d.case_ids, key=functools.partial(rank, d.name))[-self.max_cases :]) for d in self.train
            ]
        self.show_progress = show_progress
        self.protocol = protocol
        self.used: dict[str, dict[str, list[str]]] = {
            d.name: {"training": [], "held_out": [], "skipped_unseen": []} for d in datasets
        }

    def _cases(self, parts: list[Dataset], role: str, prep, keep_volume: bool, device=None):
        total = sum(len(d) for d in parts)
        pairs = ((d, c) for d in parts for c in d.case_ids)
        for d, case_id in progress(
            pairs, desc=f"dataset cases ({role})", unit="case", enable=self.show_progress, total=total
        ):
            case = d.load(case_id)
            used = self.used[d.name]
            if any(r["split"] != "seen" for r in case.records):
                if case_id not in used["skipped_unseen"]:
                    used["skipped_unseen"].append(case_id)
                continue
            if case_id not in used[role]:
                used[role].append(case_id)
            yield to_training_case(case, prep, keep_volume=keep_volume, device=device)
        if role == "training" and parts and not any(self.used[d.name][role] for d in parts):
            names = ", ".join(d.name for d in parts)
            raise InputError(
                parts[0].root,
                f"no {role.replace('_', '-')} case of {names} has only seen lesion types "
                f"({', '.join(parts[0].seen_types) or 'none marked seen'})",
            )

    def training_cases(self, prep, keep_volume: bool = False, device=None) -> Iterator:
        return self._cases(self.train, "training", prep, keep_volume, device)

    def held_out_cases(self, prep, keep_volume: bool = False, device=None) -> Iterator:
        return self._cases(self.held, "held_out", prep, keep_volume, device)

    def key(self) -> dict:
        """What a checkpoint must match to be resumed: the data and its meanings."""
        return {
            "datasets": [
                {
                    "name": d.name,
                    "mapping_sha256": d.mapping.sha256,
                    "cases": d.case_ids,
                    "seen_types": list(d.seen_types),
                }
                for d in self.datasets
            ],
            "held_out_fraction": self.held_out_fraction,
            "max_cases": self.max_cases,
        }

    def provenance(self) -> dict:
        """For the package manifest: exactly which datasets, mappings, cases and seen types."""
        out: dict[str, Any] = {"held_out_fraction": self.held_out_fraction, "max_cases": self.max_cases, "datasets": []}
        if self.protocol:
            out["protocol"] = self.protocol
        for d in self.datasets:
            used = self.used[d.name]
            out["datasets"].append(
                {
                    "name": d.name,
                    "layout": d.layout,
                    "root": str(d.root),
                    "mapping": {"path": d.mapping.path, "sha256": d.mapping.sha256},
                    "organs": str(d.organs.root) if d.organs is not None else None,
                    "seen_types": list(d.seen_types),
                    "training_cases": used["training"],
                    "held_out_cases": used["held_out"],
                    "skipped_unseen": used["skipped_unseen"],
                }
            )
        return out
