"""Loading a package's trained networks: strictly, with one-line errors."""

from __future__ import annotations

from torch import nn

from diffugts.errors import ConfigError


def load_strict(net: nn.Module, state: dict, where: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error that names the first bad keys."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ConfigError(f"{where}: weights do not match the network configuration: {'; '.join(parts)}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ConfigError(
            f"{where}: weights do not match the network configuration: {len(bad)} tensors "
            f"of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})"
        )
    net.load_state_dict(state, strict=True)


def load_head(pkg, name: str, cls):
    """The package's trained head ``name`` (a network class with ``from_config``), frozen."""
    if not pkg.has(name):
        raise ConfigError(f"{pkg.root}: the model has no trained {name} head (train it with `diffugts train {name}`)")
    net = cls.from_config(pkg.network(name)["config"])
    load_strict(net, pkg.state_dict(name), f"{pkg.root}: {name}")
    return net.eval().requires_grad_(False)
