"""The refinement head: a small trainable 3D U-Net (MONAI's BasicUNet) over the residual
channels (diffugts.stages.refine makes them) that gives the refined lesion probability."""

from __future__ import annotations

import torch
from torch import nn

# x, H, x - H, |x - H|, one feature residual per encoder level (3), the inpainted region, then the
# target's own channels (TARGET_CHANNELS): its coarse map, its organ-relative deviation, its organ
IN_CHANNELS = 9
SHARED_CHANNELS = 8
# A package's refine entry names the target channels its head was trained with; heads made
# before the organ-relative deviation existed have only the coarse map.
TARGET_CHANNELS = ("coarse", "deviation", "organ")
LEGACY_TARGET_CHANNELS = ("coarse",)


class RefineHead(nn.Module):
    def __init__(self, in_channels: int = IN_CHANNELS, features=(8, 16, 32, 64, 64, 8)):
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.config = {"in_channels": in_channels, "features": list(features)}
        # Batch norm: at inference its statistics are fixed, so a map does not depend on the
        # crop or tile it was computed in (instance / group norm would).
        self.net = BasicUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=1,
            features=tuple(features),
            norm=("batch", {}),
            act=("leakyrelu", {"negative_slope": 0.1}),
        )

    @classmethod
    def from_config(cls, config: dict) -> RefineHead:
        return cls(**config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
