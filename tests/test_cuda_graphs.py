"""The denoiser replayed from a CUDA graph: capture, check against eager, fall back.

The bookkeeping runs on the CPU with a stand-in capture; the real capture runs where CUDA is.
"""

from __future__ import annotations

import logging

import pytest
import torch

from diffugts.models import get_config
from diffugts.networks.backbones import build_backbone
from diffugts.networks.backbones.cuda_graphs import GraphedCall


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
    call = GraphedCall(capture)
    z, t = torch.rand(1, 4, 6, 8, 8), torch.tensor([3.0])
    outs = [call(_fn, z + n, t * n) for n in range(4)]
    for n, out in enumerate(outs):
        torch.testing.assert_close(out, _fn(z + n, t * n))
    assert capture.captured == [(z.shape, t.shape)]
    assert capture.replays == 1 + 3  # the check against the first (eager) call, then calls 2-4
    assert call.stats == {"captured": 1, "replayed": 3, "eager": 1, "rejected": 0}


def test_a_new_shape_replaces_the_graph():
    capture = FakeCapture()
    call = GraphedCall(capture)
    t = torch.tensor([1.0])
    for shape in ((1, 4, 6, 8, 8), (1, 4, 6, 8, 8), (1, 4, 8, 8, 8), (1, 4, 8, 8, 8), (1, 4, 6, 8, 8)):
        z = torch.rand(shape)
        torch.testing.assert_close(call(_fn, z, t), _fn(z, t))
    assert [c[0] for c in capture.captured] == [(1, 4, 6, 8, 8), (1, 4, 8, 8, 8), (1, 4, 6, 8, 8)]
    assert call.stats["replayed"] == 2


@pytest.mark.parametrize(
    "capture, why", [(FakeCapture(wrong=True), "disagrees"), (FakeCapture(fail=True), "capture failed")]
)
def test_a_graph_that_fails_or_disagrees_leaves_that_shape_eager(capture, why, caplog):
    call = GraphedCall(capture)
    z, t = torch.rand(1, 4, 6, 8, 8), torch.tensor([2.0])
    with caplog.at_level(logging.WARNING, logger="diffugts.networks.backbones.cuda_graphs"):
        outs = [call(_fn, z, t) for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, _fn(z, t))  # never the wrong replay's numbers
    assert call.stats == {"captured": 0, "replayed": 0, "eager": 3, "rejected": 1}
    assert len(caplog.records) == 1 and why in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()
    assert len(capture.captured) <= 1  # tried once for the shape, not at every call


def test_after_a_failed_capture_no_other_shape_is_captured():
    """A failed capture may leave the allocator's capture state behind: stay eager."""
    capture = FakeCapture(fail=True)
    call = GraphedCall(capture)
    t = torch.tensor([1.0])
    call(_fn, torch.rand(1, 4, 6, 8, 8), t)
    capture.fail = False
    z = torch.rand(1, 4, 8, 8, 8)
    torch.testing.assert_close(call(_fn, z, t), _fn(z, t))
    assert capture.captured == [] and call.stats["rejected"] == 1 and call.stats["eager"] == 2


def test_reset_drops_the_graph():
    capture = FakeCapture()
    call = GraphedCall(capture)
    z, t = torch.rand(1, 4, 6, 8, 8), torch.tensor([1.0])
    call(_fn, z, t)
    call.reset()
    assert call.replay is None
    call(_fn, z, t)  # captured again
    assert len(capture.captured) == 2 and call.stats["replayed"] == 0


def test_inpainting_ends_its_denoising_even_when_a_call_fails(monkeypatch):
    """The backbone is told when one inpainting's denoiser calls are over (a graph's memory
    is freed before decoding), also when denoising raises."""
    from diffugts.stages.synthesize.inpaint import inpaint

    torch.manual_seed(0)
    backbone = build_backbone(get_config("demo"))
    ended = []
    monkeypatch.setattr(backbone, "end_denoising", lambda: ended.append(True))
    x = torch.rand(1, 1, 32, 32, 32)
    mask = torch.ones(1, 1, 8, 8, 8)
    args = dict(strength=0.5, steps=2, jumps=0, seed=0, show_progress=False)
    inpaint(backbone, x, mask, (2.75, 2.75, 4.0), **args)
    assert ended == [True]

    def broken(*a):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(backbone, "denoise", broken)
    with pytest.raises(RuntimeError):
        inpaint(backbone, x, mask, (2.75, 2.75, 4.0), **args)
    assert ended == [True, True]


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
@pytest.mark.parametrize("name, latent", [("demo", (8, 16, 16)), ("maisi-ct", (16, 16, 16))])
def test_cuda_graph_denoiser_agrees_with_eager_on_the_gpu(name, latent):
    """The production path (maisi-ct: flash attention, class embedding) captured for real."""
    torch.manual_seed(0)
    config = get_config(name)
    graphed = build_backbone(config, device="cuda")
    eager = build_backbone(config, device="cuda")
    eager.load_state_dict(graphed.state_dict())
    eager.graphed = None
    spacing = tuple(config["preprocessing"]["spacing_mm"])
    channels = config["unet"]["in_channels"]
    for shape in (latent, latent, latent, (latent[0] * 2, *latent[1:])):  # then another shape
        z = torch.rand(1, channels, *shape, device="cuda")
        t = float(torch.randint(100, 900, ()))
        torch.testing.assert_close(graphed.denoise(z, t, spacing), eager.denoise(z, t, spacing), rtol=1e-3, atol=1e-3)
    assert graphed.graphed.stats == {"captured": 2, "replayed": 2, "eager": 2, "rejected": 0}
    graphed.end_denoising()
    assert graphed.graphed.replay is None
