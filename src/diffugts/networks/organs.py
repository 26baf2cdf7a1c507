"""Organ grounding: a small 3D U-Net (MONAI's BasicUNet) that labels the named organs a
target's region map needs, from the image alone.

Why a network beside the AOVA head (a departure from the paper's text, docs/method.md
"Organ grounding"): the AOVA region branch reads each voxel's frozen backbone features
through 1x1 adapters, so it sees little context. On the development seeds it confused the
spleen with the kidneys and barely found the pancreas (region Dice 0.13 / 0.00 in CT), and
every later step (the organ-relative deviation, the fusion, refinement) works inside that
region. Organs are told apart by where they lie and by their shape, which a U-Net over the
whole volume sees. Trained SynthSeg-style on random per-tissue intensities
(diffugts.train.randomise), so the same weights ground organs in CT and MR. Each organ's
label includes the lesions it holds: a region that excludes its lesions hides them.

The labels are organ *families* ("kidney" for both kidneys), the names prompts use; a
target whose organ is not among them keeps the AOVA head's own region map.

Claims (``claim_log_odds``, networks trained with :data:`ANATOMY`): an organ's map is closed
over its concavities and holes so that it holds its lesions (diffugts.stages.deviation), and
so it also took in the vena cava against the liver, the kidney in the liver's concavity and
the vessels along the pancreas, healthy anatomy that the normative model then flagged as
unlike the organ. A network that labels that anatomy too claims it: where another of its
classes has log-odds above ``claim_log_odds``, an organ's log-odds read :data:`CLAIMED`, and
its inclusions do not take the voxel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Anatomy no prompt targets that an organ network may label beside the organs, so that it claims
# it (module docstring): the vena cava and the abdominal vessels (phantom labels).
ANATOMY = ("inferior vena cava", "abdominal vessels")
CLAIMED = float("-inf")  # an organ's log-odds where another class claims the voxel
CLAIM_LOG_ODDS = 0.0  # networks trained with ANATOMY: a class claims the voxels it calls its own (log-odds > 0)


class OrganNet(nn.Module):
    """Per-voxel organ logits (background first) at ``downsample`` of the model grid in-plane,
    resized back to the input grid. ``claim_log_odds``: see the module docstring (None: no
    claims, networks trained before 2026-12-05)."""

    def __init__(
        self,
        organs: list[str],
        features=(8, 16, 24, 32, 48, 8),
        downsample: int = 2,
        claim_log_odds: float | None = None,
    ):
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.config = {"organs": list(organs), "features": list(features), "downsample": downsample}
        if claim_log_odds is not None:  # older configs stay as they were
            self.config["claim_log_odds"] = float(claim_log_odds)
        self.organs = list(organs)
        self.downsample = downsample
        self.claim_log_odds = claim_log_odds
        # Instance norm: one whole volume per pass, so no batch statistics to freeze, and a
        # scale-free input (CT and MR intensities differ in level and spread).
        self.net = BasicUNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=len(organs) + 1,
            features=tuple(features),
            norm=("instance", {"affine": True}),
            act=("leakyrelu", {"negative_slope": 0.1}),
        )

    @classmethod
    def from_config(cls, config: dict) -> OrganNet:
        return cls(**config)

    def work_shape(self, shape) -> tuple[int, int, int]:
        """The grid the U-Net runs on: in-plane halved (``downsample``), every axis a multiple
        of 16 (its four poolings)."""
        k, j, i = shape
        d = self.downsample
        return tuple(max(16, int(round(n / 16)) * 16) for n in (k, j // d, i // d))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, k, j, i) on the model grid in [0, 1] -> logits (B, 1 + organs, k, j, i)."""
        shape = tuple(x.shape[2:])
        small = F.interpolate(x, size=self.work_shape(shape), mode="trilinear", align_corners=False)
        logits = self.net(small)
        return F.interpolate(logits, size=shape, mode="trilinear", align_corners=False)

    @torch.no_grad()
    def log_odds(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per organ its log-odds against everything else, (B, *S) each."""
        lp = torch.log_softmax(self.forward(x).float(), dim=1)
        out = {}
        for n, organ in enumerate(self.organs, start=1):
            rest = torch.cat([lp[:, :n], lp[:, n + 1 :]], 1).logsumexp(1)
            out[organ] = lp[:, n] - rest
        return out


def load_organ_net(pkg) -> OrganNet | None:
    """The package's organ grounding network (frozen), None for a package without one."""
    from diffugts.config import ORGAN_NET
    from diffugts.networks.loading import load_head

    return load_head(pkg, ORGAN_NET, OrganNet) if pkg.has(ORGAN_NET) else None


def organ_maps(net: OrganNet | None, x) -> dict:
    """Per organ its log-odds on the model grid (numpy), from one pass over the whole volume
    ``x`` (a numpy array or a (1, 1, *S) tensor); empty without a network."""
    if net is None:
        return {}
    device = next(net.parameters()).device
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)
    xt = xt.reshape((1, 1) + tuple(xt.shape[-3:]))
    maps = {organ: lo[0].float().cpu().numpy() for organ, lo in net.log_odds(xt).items()}
    return claimed(maps, net.claim_log_odds) if net.claim_log_odds is not None else maps


def claimed(maps: dict[str, np.ndarray], claim_log_odds: float) -> dict[str, np.ndarray]:
    """Each class's log-odds, :data:`CLAIMED` where another class's exceed ``claim_log_odds``
    and its own are not positive (module docstring)."""
    above = {organ: lo > claim_log_odds for organ, lo in maps.items()}
    holders = sum(a.astype(np.int8) for a in above.values())  # classes above the threshold per voxel
    out = {}
    for organ, lo in maps.items():
        taken = (holders - above[organ] > 0) & (lo <= 0)  # another class holds it, this one does not
        out[organ] = np.where(taken, np.float32(CLAIMED), lo).astype(np.float32)
    return out


def grounded_region(organ: str | None, head_region, grounding: dict):
    """The region log-odds a target's organ comes from: the organ network's where it knows
    the organ, else the AOVA head's own region map."""
    return grounding[organ] if organ in grounding else head_region
