"""The anomaly discriminator: how unlike healthy tissue of its organ a voxel looks, learnt from
healthy tissue and *generic synthetic anomalies* painted into it.

The normative mixture (diffugts.stages.normative) scores a voxel by how rare its appearance
features are among healthy voxels. Rare is not the same as abnormal: a small homogeneous blob
a little darker than a kidney's cortex has features that healthy kidneys also show, one by one
(partial volume at the renal sinus has its mean intensity, the medulla its shape), so its
likelihood stays unremarkable. A classifier that has seen healthy tissue *and* blobs of
unusual intensity painted into it learns the combination (self-supervised anomaly detection:
DRAEM, foreign-patch interpolation). What it sees is no lesion type: ellipsoids of random
size, lobulation, edge and texture, their intensity shifted either way by a random multiple
of the organ's spread (diffugts.train.anomalies.organ_relative_anomaly), in every organ and
modality the normative model knows; no lesion label is used.

Per organ and modality a small MLP (two hidden layers) over the normative features, standardised;
its score is the log-odds of "painted anomaly", cut at quantiles of healthy voxels' scores as
the mixture's negative log-likelihood is (docs/method.md, "anomaly discriminator").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

HIDDEN = 64  # units per hidden layer
STEPS = 3000  # Adam steps of 4096 rows: about 20 s per organ and modality on one core


def mlp(features: int, hidden: int = HIDDEN) -> nn.Sequential:
    """The discriminator's network: features -> log-odds (torch has this; MONAI's MLPBlock is a
    transformer block's, with a fixed residual layout)."""
    return nn.Sequential(
        nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
    )


@dataclass
class Discriminator:
    """One organ and modality's anomaly discriminator: the features' centre and scale, the MLP,
    and the scores of the healthy voxels' ``low``/``high`` quantiles."""

    centre: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    net: nn.Sequential
    low: float
    high: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,) log-odds of anomaly."""
        if len(features) == 0:
            return np.zeros(0, np.float32)
        x = (np.asarray(features, np.float32) - self.centre) / self.scale
        with torch.no_grad():
            return self.net(torch.as_tensor(x, dtype=torch.float32))[:, 0].numpy()

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.centre": torch.as_tensor(self.centre), f"{prefix}.scale": torch.as_tensor(self.scale)}
        out.update({f"{prefix}.net.{k}": v.detach().clone() for k, v in self.net.state_dict().items()})
        return out

    @classmethod
    def load(cls, state: dict, prefix: str, low: float, high: float) -> Discriminator:
        centre = state[f"{prefix}.centre"].float().numpy()
        net = mlp(len(centre))
        net.load_state_dict(
            {k[len(prefix) + 5 :]: v.float() for k, v in state.items() if k.startswith(f"{prefix}.net.")}
        )
        net.eval()
        return cls(centre, state[f"{prefix}.scale"].float().numpy(), net, low, high)


@dataclass
class Committee:
    """Several discriminators of one organ and modality, each fitted on lesion-free cases of its
    own; a voxel's score is the mean of their log-odds, cut at the healthy quantiles of that
    mean (``low``/``high``). Tried because one discriminator also learns the quirks of the
    dozen cases it saw; with two members it kept more false candidates than one, so it is an
    option, not the recipe's (docs/benchmarks.md, "a committee of discriminators")."""

    members: list[Discriminator]
    low: float
    high: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,) the members' mean log-odds of anomaly."""
        return np.mean([m.score(features) for m in self.members], axis=0).astype(np.float32)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Member 0 under ``prefix`` (as a lone discriminator), member m under ``prefix`` + m."""
        out: dict[str, torch.Tensor] = {}
        for i, m in enumerate(self.members):
            out.update(m.state_dict(prefix if i == 0 else f"{prefix}{i}"))
        return out

    @classmethod
    def load(cls, state: dict, prefix: str, members: int, low: float, high: float) -> Committee:
        return cls(
            [Discriminator.load(state, prefix if i == 0 else f"{prefix}{i}", low, high) for i in range(members)],
            low,
            high,
        )


def fit_discriminator(
    anomalies: np.ndarray, healthy: np.ndarray, seed: int = 0, steps: int | None = None, batch: int = 4096
) -> Discriminator:
    """An MLP telling ``anomalies`` (N, F) from ``healthy`` (M, F) feature rows, the classes
    weighted equally (thresholds unset: the caller cuts at healthy quantiles)."""
    torch.manual_seed(seed)
    x = np.concatenate([anomalies, healthy]).astype(np.float32)
    centre, scale = x.mean(0), x.std(0) + 1e-6
    xt = torch.as_tensor((x - centre) / scale)
    yt = torch.cat([torch.ones(len(anomalies)), torch.zeros(len(healthy))])
    weight = torch.where(yt > 0, len(healthy) / max(len(anomalies), 1), 1.0)
    net = mlp(x.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(STEPS if steps is None else steps):
        idx = torch.randint(len(xt), (min(batch, len(xt)),), generator=gen)
        loss = nn.functional.binary_cross_entropy_with_logits(net(xt[idx])[:, 0], yt[idx], weight=weight[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return Discriminator(centre, scale, net, 0.0, 0.0)
