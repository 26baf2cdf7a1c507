"""Which datasets and cases a command works on: explicit ``--dataset/--mapping/--organs``
lists, or a protocol split file over a data root (``--protocol``, ``--data-root``)."""

from __future__ import annotations

from pathlib import Path

from diffugts.datasets import Dataset, open_dataset
from diffugts.datasets.protocol import Protocol, load_protocol, open_protocol_datasets, split_cases
from diffugts.errors import ConfigError, ParameterError

DEFAULT_PROTOCOL = "paper-protocol"


def explicit(paths, mappings, organs, seen_types) -> list[Dataset]:
    """``--dataset`` (repeatable) with one ``--mapping`` for all or one each, and ``--organs``
    likewise (``-`` for a dataset without one)."""
    paths, mappings, organs = list(paths or []), list(mappings or []), list(organs or [])
    if not paths:
        return []
    if len(mappings) not in (1, len(paths)):
        raise ParameterError(
            f"{len(paths)} {{datasets}} but {len(mappings)} {{mappings}}: give one mapping for all, "
            "or one per dataset (a file or a shipped name)",
            "datasets",
            "mappings",
        )
    if len(organs) not in (0, 1, len(paths)):
        raise ParameterError(
            f"{len(paths)} {{datasets}} but {len(organs)} {{organs}}: give none, one for all, or "
            "one per dataset ('-' for none)",
            "datasets",
            "organs",
        )
    mappings = mappings * len(paths) if len(mappings) == 1 else mappings
    organs = (organs * len(paths) if len(organs) == 1 else organs) or ["-"] * len(paths)
    datasets = [open_dataset(p, m, None if o == "-" else o, seen_types) for p, m, o in zip(paths, mappings, organs)]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ConfigError(
            f'two datasets are named {max(names, key=names.count)!r} (the mapping\'s "name"): '
            "give each dataset its own mapping name"
        )
    return datasets


def protocol_of(ref: str | None, data_root=None) -> Protocol:
    """A shipped split file by name, or a file; a relative path is looked up under
    ``data_root`` first (where the pipeline's data volume is mounted)."""
    ref = ref or DEFAULT_PROTOCOL
    if data_root is not None and not Path(ref).is_absolute() and (Path(data_root) / ref).is_file():
        ref = str(Path(data_root) / ref)
    return load_protocol(ref)


def training_sets(datasets: list[Dataset], fraction: float) -> tuple[list[Dataset], list[Dataset]]:
    """(training part, held-out part) of each dataset: the held-out cases validate training."""
    train, held = [], []
    for d in datasets:
        t, h = split_cases(d, fraction)
        train.append(d.subset(t))
        held.append(d.subset(h))
    return train, held


def evaluation_sets(protocol: Protocol, data_root) -> list[tuple[str, Dataset]]:
    """(role, dataset): the held-out cases of the training datasets ("seen") and every case of
    the evaluation datasets ("unseen")."""
    _, held = training_sets(open_protocol_datasets(protocol, data_root, "train"), protocol.held_out_fraction)
    return [("held-out", d) for d in held if len(d)] + [
        ("evaluate", d) for d in open_protocol_datasets(protocol, data_root, "evaluate")
    ]
