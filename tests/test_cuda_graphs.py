"""The denoiser replayed from a CUDA graph: capture, check against eager, fall back.

The bookkeeping runs on the CPU with a stand-in capture; the real capture runs where CUDA is.
"""

from __future__ import annotations

import logging

import pytest
import torch

from diffugts.backbones import build_backbone
from diffugts.backbones.cuda_graphs import GraphedCall
from diffugts.models import get_config


def _fn(z, t):
    return z * 2 + t


class FakeCapture:
    """Records captures; its replay computes ``fn`` on copies of the inputs (or, ``wrong``, not)."""

    def __init__(self, wrong: bool = False, fail: bool = False):
        self.wrong, self.fail, self.captured, self.replays = wrong, fail, [], 0

    def __call__(self, fn, inputs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        self.captured.append(tuple(t.shape for t in inputs))

        def replay(new):
            self.replays += 1
            out = fn(*(t.clone() for t in new))
            return out + 1 if self.wrong else out
        return replay


def test_a_shape_is_captured_once_then_replayed_with_eager_results():
    capture = FakeCapture()
    call = GraphedCall(_fn, capture)
    z, t = torch.rand(1, 4, 6, 8, 8), torch.tensor([3.0])
    outs = [call(z + n, t * n) for n in range(4)]
    for n, out in enumerate(outs):
        torch.testing.assert_close(out, _fn(z + n, t * n))
    assert capture.captured == [(z.shape, t.shape)]
    assert capture.replays == 1 + 3  # the check against the first (eager) call, then calls 2-4
    assert call.stats == {"captured": 1, "replayed": 3, "eager": 1, "rejected": 0}


def test_a_new_shape_replaces_the_graph():
    capture = FakeCapture()
    call = GraphedCall(_fn, capture)
    t = torch.tensor([1.0])
    for shape in ((1, 4, 6, 8, 8), (1, 4, 6, 8, 8), (1, 4, 8, 8, 8), (1, 4, 8, 8, 8), (1, 4, 6, 8, 8)):
        z = torch.rand(shape)
        torch.testing.assert_close(call(z, t), _fn(z, t))
    assert [c[0] for c in capture.captured] == [(1, 4, 6, 8, 8), (1, 4, 8, 8, 8), (1, 4, 6, 8, 8)]
    assert call.stats["replayed"] == 2


@pytest.mark.parametrize("capture, why", [(FakeCapture(wrong=True), "disagrees"), (FakeCapture(fail=True), "capture failed")])
def test_a_graph_that_fails_or_disagrees_leaves_that_shape_eager(capture, why, caplog):
    call = GraphedCall(_fn, capture)
    z, t = torch.rand(1, 4, 6, 8, 8), torch.tensor([2.0])
    with caplog.at_level(logging.WARNING, logger="diffugts.backbones.cuda_graphs"):
        outs = [call(z, t) for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, _fn(z, t))  # never the wrong replay's numbers
    assert call.stats == {"captured": 0, "replayed": 0, "eager": 3, "rejected": 1}
    assert len(caplog.records) == 1 and why in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()
    assert len(capture.captured) <= 1  # tried once for the shape, not at every call


def test_denoise_conditioning_is_made_once_and_matches_the_unet_called_directly():
    torch.manual_seed(0)
    config = get_config("demo")
    backbone = build_backbone(config)
    assert backbone.graphed is None  # CPU: eager
    z = torch.rand(1, 4, 8, 16, 16)
    spacing = (2.75, 2.75, 4.0)
    out = backbone.denoise(z, 300.0, spacing)
    direct = backbone.unet(z, torch.full((1,), 300.0), spacing_tensor=torch.tensor([list(spacing)]) * 100)
    torch.testing.assert_close(out, direct.float())
    cached = backbone._conditioning(1, spacing, z.device)
    backbone.denoise(z, 200.0, spacing)
    assert backbone._conditioning(1, spacing, z.device)[0] is cached[0]
    backbone.denoise(z, 200.0, (1.0, 1.0, 1.0))  # another spacing: made anew
    assert backbone._conditioning(1, (1.0, 1.0, 1.0), z.device)[0].tolist() == [[100.0, 100.0, 100.0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_denoiser_agrees_with_eager_on_the_gpu():
    torch.manual_seed(0)
    config = get_config("demo")
    graphed = build_backbone(config, device="cuda")
    eager = build_backbone(config, device="cuda")
    eager.load_state_dict(graphed.state_dict())
    eager.graphed = None
    z = torch.rand(1, 4, 8, 16, 16, device="cuda")
    for t in (800.0, 500.0, 200.0):
        torch.testing.assert_close(graphed.denoise(z, t, (2.75, 2.75, 4.0)), eager.denoise(z, t, (2.75, 2.75, 4.0)),
                                   rtol=1e-3, atol=1e-3)
    assert graphed.graphed.stats == {"captured": 1, "replayed": 2, "eager": 1, "rejected": 0}
