"""Replaying the denoiser as a captured CUDA graph.

Synthesis calls the denoiser ten times on one small latent crop. On the H100 each call took
28 ms in bf16 and in fp32 alike: the time goes to launching its ~1000 small kernels, not to
running them. A CUDA graph captured once per latent shape launches them all at once
(``torch.cuda.CUDAGraph``: inputs are copied into the graph's static tensors, the output is
copied out).

Capture must not change results, so the first replay is checked against an eager call on the
same input; a graph that does not agree is dropped (logged once) and that shape stays eager,
and after a failed capture the process stays eager. One graph is kept at a time, and
inpainting drops it when its denoising is done (``Backbone.end_denoising``), so its memory
pool is not held through decoding and refinement, and a cohort does not accumulate graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Replay = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]


def capture_cuda_graph(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Replay:
    """``fn`` over ``inputs``' shapes captured as one CUDA graph on the inputs' device; returns
    its replay. The output buffer is filled with NaN after capture, so a graph that recorded
    nothing (work that ran outside the capture) cannot pass the check against eager."""
    device = inputs[0].device
    static = tuple(t.clone() for t in inputs)
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)):
        # The outer stream context restores the current stream even if a capture fails.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
            fn(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = fn(*static)
        out.fill_(float("nan"))

    def replay(new: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for s, t in zip(static, new):
            s.copy_(t)
        graph.replay()
        return out.clone()

    return replay


class GraphedCall:
    """``fn(*tensors)`` replayed from a captured graph once its shape has been captured and
    checked. The function is passed at each call (the graph's owner keeps this object, so it
    must not hold the owner). ``capture`` is :func:`capture_cuda_graph` (replaceable in tests).
    After a failed capture no other is tried: a failure can leave the allocator's capture
    state behind, so that process stays eager."""

    def __init__(self, capture: Callable[..., Replay] = capture_cuda_graph, rtol: float = 1e-3, atol: float = 1e-3):
        self.capture, self.rtol, self.atol = capture, rtol, atol
        self.key: tuple | None = None
        self.replay: Replay | None = None
        self.eager_keys: set[tuple] = set()
        self.failed = False
        self.stats = {"captured": 0, "replayed": 0, "eager": 0, "rejected": 0}

    def __call__(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs)
        if self.replay is not None and key == self.key:
            self.stats["replayed"] += 1
            return self.replay(inputs)
        out = fn(*inputs)
        self.stats["eager"] += 1
        if key not in self.eager_keys and not self.failed:
            self._capture(fn, key, inputs, out)
        return out

    def reset(self) -> None:
        """Drop the graph (and its memory pool)."""
        self.key = self.replay = None

    def _capture(self, fn, key: tuple, inputs: tuple[torch.Tensor, ...], expected: torch.Tensor) -> None:
        self.reset()  # the previous graph (and its memory) goes first
        try:
            replay = self.capture(fn, inputs)
            check = replay(inputs)
        except RuntimeError as err:
            self.failed = True
            self._reject(key, f"capture failed ({str(err).splitlines()[0]}); no other capture is tried")
            return
        tol = self.atol * max(1.0, float(expected.abs().max()))
        why = None
        if check.shape != expected.shape:
            why = "replay has another shape than the eager call"
        elif not torch.allclose(check, expected, rtol=self.rtol, atol=tol):
            why = f"replay disagrees with the eager call (max difference {float((check - expected).abs().max()):.3g})"
        if why:
            self._reject(key, why)
            return
        self.key, self.replay = key, replay
        self.stats["captured"] += 1

    def _reject(self, key: tuple, why: str) -> None:
        self.eager_keys.add(key)
        self.stats["rejected"] += 1
        log.warning("denoiser stays eager for latent shape %s: CUDA graph %s", key[0][0], why)
