"""Where the networks run: a GPU when there is one, the CPU (with a warning) otherwise."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    log.warning("no GPU found: running on the CPU (slow for full-size models)")
    return torch.device("cpu")
