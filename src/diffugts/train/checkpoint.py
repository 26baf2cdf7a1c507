"""Resumable training loops: the head, its optimiser, the sampling generator and the loss
history, saved every ``every`` steps; a run that finds a checkpoint of the same training
(same ``key``) resumes from it and ends with the weights an uninterrupted run would have.

A checkpoint of other training (another seed, other cases) is left alone and ignored (a
warning says so); one that finished is removed once its package is written.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch

from diffugts.utils import atomic

log = logging.getLogger(__name__)


class Checkpoint:
    def __init__(self, path: str | Path, key: dict, every: int = 100):
        self.path, self.key, self.every = Path(path), dict(key), max(1, int(every))
        self.resumed_from = 0

    def restore(
        self, head: torch.nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator, history: list
    ) -> int:
        """The step to start from (0 when there is nothing to resume)."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("key") != self.key:
            log.warning(
                "%s: a checkpoint of other training (seed, cases or settings differ): starting afresh", self.path
            )
            return 0
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        history[:] = state["history"]
        self.resumed_from = int(state["step"])
        log.info("resuming %s from step %d", self.path.name, self.resumed_from)
        return self.resumed_from

    def step(self, done: int, head, opt, rng, history: list, total: int) -> None:
        """Call after each step (``done`` steps finished): saves every ``every`` steps."""
        if done % self.every and done != total:
            return
        buf = io.BytesIO()
        torch.save(
            {
                "key": self.key,
                "step": done,
                "head": head.state_dict(),
                "opt": opt.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "history": history,
            },
            buf,
        )
        atomic.write_bytes(self.path, buf.getvalue())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.path.parent.is_dir() and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()
