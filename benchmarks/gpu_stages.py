"""Attend, synthesize and refine of one CT study on the GPU, optimized vs fp32 baseline.

    python benchmarks/gpu_stages.py                                  # maisi-ct, 512x512x128 and x256
    python benchmarks/gpu_stages.py --config demo --shapes 96x96x48 --device cpu   # smoke test

The `maisi-ct` configuration is built with random weights (timing does not depend on them)
and run on a synthetic abdomen-like volume (0.75 mm in-plane, 1.5 mm slices). Per stage it
prints wall time (CUDA-synchronised) and peak GPU memory, for two variants of the *same*
code path in the same process:

  optimized  bf16 autocast, flash attention (SDPA), fused GroupNorm, whole-volume windows,
             study <-> model grid resampling with torch on the GPU (Backbone.resample_device),
             the method's default 10 denoising steps replayed from a CUDA graph (captured
             anew in every inpainting, so in every timed study, and checked against an
             eager call), a refinement head pass only for the prompts with a
             region (here the one with the lesion), batched
  eager      the same without the CUDA graph (to show what the graph buys)
  baseline   MaisiBackbone(optimized=False): fp32, MONAI's loop GroupNorm, no flash attention, no graph,
             resampling in SimpleITK on the host, 20 denoising steps (the default until 10
             were shown to synthesize as well: docs/synthesis.md), one refinement head pass
             per prompt (four)

and the ratio baseline/optimized. The FLOPs of each optimized stage are counted once with
torch.utils.flop_counter and set against the card's bf16 dense peak (H100 SXM: 989 TFLOP/s
spec; the measured 8192^3 bf16 matmul rate is printed beside it).

Four prompts are attended in one pass (the AOVA head takes all targets at once). The text
encoder is not on the GPU path (its embeddings are cached per prompt), so fixed random
embeddings stand in for it here. Synthesis inpaints a 30 mm liver lesion dilated by 8 mm
with the method's defaults (strength 0.8; steps as above). Refinement runs on that region; only
the first prompt ("liver tumor") has a region there, as in a study with one finding.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from diffugts.artifacts.geometry import Geometry
from diffugts.config import SynthesisParams
from diffugts.models.configs import get_config
from diffugts.networks.aova import AOVAHead
from diffugts.networks.backbones.cuda_graphs import GraphedCall
from diffugts.networks.backbones.maisi import MaisiBackbone
from diffugts.networks.refine import RefineHead
from diffugts.networks.text import make_target
from diffugts.stages.attend import Method, attention_maps
from diffugts.stages.preprocess import Preprocessing, normalise, to_model
from diffugts.stages.refine import refine_probability, shared_inputs
from diffugts.stages.synthesize import make_region, pseudo_healthy
from diffugts.train.recipe import default_features
from diffugts.utils.atomic import write_json

PROMPTS = ["liver tumor", "kidney tumor", "pancreas tumor", "spleen lesion"]
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def synthetic_ct(shape_xyz: tuple[int, int, int], spacing=(0.75, 0.75, 1.5)) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """Body cylinder, liver ellipsoid and a 30 mm hypodense lesion; (volume kji, geometry, lesion)."""
    nx, ny, nz = shape_xyz
    k, j, i = np.ogrid[:nz, :ny, :nx]
    zc, yc, xc = (k - nz / 2) * spacing[2], (j - ny / 2) * spacing[1], (i - nx / 2) * spacing[0]
    rng = np.random.default_rng(0)
    vol = np.full((nz, ny, nx), -1000, np.float32)
    body = (xc / (0.45 * nx * spacing[0])) ** 2 + (yc / (0.35 * ny * spacing[1])) ** 2 <= 1
    vol[np.broadcast_to(body, vol.shape)] = 40
    w, h, d = nx * spacing[0], ny * spacing[1], nz * spacing[2]  # mm
    cx, cy = -0.15 * w, -0.03 * h  # liver (and lesion) centre, right of the midline
    liver = ((xc - cx) / (0.25 * w)) ** 2 + ((yc - cy) / (0.2 * h)) ** 2 + (zc / (0.3 * d)) ** 2 <= 1
    vol[liver] = 60
    r = min(15.0, 0.08 * w)  # a 30 mm lesion at full size
    lesion = (xc - cx) ** 2 + (yc - cy) ** 2 + zc**2 <= r**2
    vol[lesion] = 10
    vol += rng.normal(0, 10, vol.shape).astype(np.float32)
    return vol, Geometry((0, 0, 0), spacing, np.eye(3), vol.shape), lesion


class FixedEmbeddings:
    """Deterministic unit vectors per prompt, in place of the (CPU-side, cached) text encoder."""

    def __init__(self, dim: int, device):
        self.dim, self.device = dim, device

    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(abs(hash(t)) % (1 << 31))
            v = torch.randn(self.dim, generator=g)
            out.append(v / v.norm())
        return torch.stack(out).to(self.device)


@dataclass
class BenchPackage:
    """What attention_maps reads from a package: the AOVA feature list and the window size."""

    roi: tuple[int, int, int] | None
    features: list[str]

    def network(self, name: str) -> dict:
        return {"features": list(self.features)}

    @property
    def manifest(self) -> dict:
        return {"inference": {"roi_size": list(self.roi) if self.roi else None}}


class Stopwatch:
    def __init__(self, device: torch.device):
        self.device = device
        self.rows: dict[str, dict] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        row = {"s": time.perf_counter() - t0}
        if cuda:
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9  # weights included: what a card must hold
        self.rows[name] = row


BASELINE_STEPS = 20  # the synthesis default before fewer steps were measured to be as good


def run_study(
    backbone, heads, prep, volume, geometry, lesion, device, roi, watch: Stopwatch | None, features: list[str]
):
    """The three stages, as the study pipeline runs them (same functions)."""
    watch = watch or Stopwatch(device)
    aova, refine_head = heads
    method = Method(
        BenchPackage(roi, features), backbone, aova, FixedEmbeddings(aova.config["text_dim"], device), prep, device
    )
    targets = [make_target(p) for p in PROMPTS]
    with watch.stage("attend"):  # includes the study -> model grid resampling, as the stage does
        x, space = to_model(volume, geometry, "CT", prep, device=backbone.resample_device)
        probs, _ = attention_maps(method, x, prep.spacing_mm, targets)
    region = make_region(lesion, tuple(geometry.spacing[::-1]), 8.0, 4.0)
    parts: dict = {}
    if backbone.graphed is not None:  # fresh counts; inpainting captures its graph anew (timed)
        backbone.graphed = GraphedCall()
    with watch.stage("synthesize"):
        params = SynthesisParams() if backbone.optimized else SynthesisParams(steps=BASELINE_STEPS)
        pseudo, info = pseudo_healthy(volume, geometry, "CT", region, backbone, prep, params, tile=None, timings=parts)
    watch.rows["synthesize"]["parts"] = {k: round(v, 3) for k, v in parts.items()}
    if backbone.graphed is not None:
        info["cuda_graph"] = dict(backbone.graphed.stats)
    with watch.stage("refine"):
        t0 = time.perf_counter()
        h = normalise(pseudo, "CT", prep)
        h_model = space.to_model(h)
        dilated = space.to_model(region.dilated.astype(np.float32)) > 0.5
        t1 = time.perf_counter()
        shared = shared_inputs(backbone, x, h_model, dilated, as_tensor=True)
        _sync(device)
        t2 = time.perf_counter()
        # Four prompts, one finding (the liver lesion's): the method's refine() passes only
        # prompts with a region, in one batch; before that it ran one pass per prompt.
        if backbone.optimized:
            refine_probability(refine_head, shared, probs[:1], roi=roi, bf16=True)
        else:
            for p in probs:
                refine_probability(refine_head, shared, p, roi=roi, bf16=False)
        t3 = time.perf_counter()
    watch.rows["refine"]["parts"] = {
        "resample": round(t1 - t0, 3),
        "features": round(t2 - t1, 3),
        "head": round(t3 - t2, 3),
    }
    return watch.rows, info


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_rate(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="maisi-ct")
    ap.add_argument("--shapes", default="512x512x128,512x512x256", help="x*y*z voxels, comma-separated")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--roi",
        default=None,
        help="attention/refinement window on the model grid, e.g. 128x128x128 "
        "(default: the whole volume in one window)",
    )
    ap.add_argument(
        "--variants",
        default="optimized,eager,baseline",
        help="eager = optimized without the CUDA graph (on the CPU the two are the same)",
    )
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = get_config(args.config)
    prep = Preprocessing.from_dict(config["preprocessing"])
    roi = tuple(int(v) for v in args.roi.split("x"))[::-1] if args.roi else None
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device: {card}; config {args.config}; torch {torch.__version__}")

    reference = MaisiBackbone(config, device=device, optimized=True)
    state = (reference.vae.state_dict(), reference.unet.state_dict())
    specs = reference.feature_specs()
    features = default_features(reference)
    index = reference.feature_index(features)
    aova = AOVAHead([specs[i].channels for i in index], text_dim=384, dim=64).to(device).eval()
    refine_head = RefineHead().to(device).eval()
    cases = {s: synthetic_ct(s) for s in shapes}
    results: dict = {"device": card, "config": args.config, "shapes": {}}

    for variant in args.variants.split(","):
        if variant not in ("optimized", "eager", "baseline"):
            raise SystemExit(f"unknown variant {variant!r} (optimized, eager, baseline)")
        if variant == "optimized":
            backbone = reference
        else:  # "eager": optimized but no CUDA graph (what the graph buys); "baseline"
            backbone = MaisiBackbone(config, device=device, optimized=variant == "eager", cuda_graphs=False)
            backbone.vae.load_state_dict(state[0])
            backbone.unet.load_state_dict(state[1])
        # Warm-up (kernel selection, allocator) on the first shape, untimed.
        run_study(backbone, (aova, refine_head), prep, *cases[shapes[0]], device, roi, None, features)
        for shape in shapes:
            rows, info = run_study(backbone, (aova, refine_head), prep, *cases[shape], device, roi, None, features)
            total = {"s": sum(r["s"] for r in rows.values())}
            if device.type == "cuda":
                total["peak_gb"] = max(r["peak_gb"] for r in rows.values())
            rows["total"] = total
            results["shapes"].setdefault("x".join(map(str, shape)), {})[variant] = rows
            print(
                f"{variant:9s} {'x'.join(map(str, shape)):12s} "
                + "  ".join(
                    f"{k} {v['s']:.2f} s" + (f" ({v['peak_gb']:.1f} GB)" if "peak_gb" in v else "")
                    for k, v in rows.items()
                )
                + f"  [synthesis crop {info['crop_model_kji']}, {info['denoiser_calls']} denoiser calls"
                + (f", CUDA graph {info['cuda_graph']}" if "cuda_graph" in info else "")
                + "]",
                flush=True,
            )
            rows["synthesize"]["cuda_graph"] = info.get("cuda_graph")
            save(args.json, results)  # as it goes: a run cut short keeps what it measured
            print(
                " " * 23
                + "  ".join(
                    f"{k}: " + ", ".join(f"{a} {b:.2f}" for a, b in v["parts"].items())
                    for k, v in rows.items()
                    if "parts" in v
                ),
                flush=True,
            )
        if backbone is not reference:
            del backbone
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for shape, by in results["shapes"].items():
        if "optimized" in by and "baseline" in by:
            ratio = {k: by["baseline"][k]["s"] / by["optimized"][k]["s"] for k in by["optimized"]}
            for stage in ("synthesize", "refine"):
                for part, seconds in by["optimized"][stage]["parts"].items():
                    ratio[f"{stage}.{part}"] = by["baseline"][stage]["parts"][part] / max(seconds, 1e-6)
            by["speedup"] = ratio
            print(f"speedup   {shape:12s} " + "  ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
        if "optimized" in by and "eager" in by:
            eager, graphed = (by[v]["synthesize"]["parts"]["denoise"] for v in ("eager", "optimized"))
            by["cuda_graph_denoise_speedup"] = eager / max(graphed, 1e-6)
            print(
                f"graph     {shape:12s} denoise eager {eager:.3f} s, CUDA graph {graphed:.3f} s: "
                f"{by['cuda_graph_denoise_speedup']:.2f}x"
            )

    if not args.no_flops and "optimized" in args.variants:
        shape = shapes[0]
        flops = {}
        watch = Stopwatch(device)

        def stage(name):
            def fn():
                run_study(reference, (aova, refine_head), prep, *cases[shape], device, roi, watch, features)

            return fn

        # Eager while counting: a graph's warm-up and capture would count its first call thrice.
        graphed, reference.graphed = reference.graphed, None
        total = count_flops(stage("all"))
        reference.graphed = graphed
        flops["total"] = total
        opt = results["shapes"]["x".join(map(str, shape))]["optimized"]
        seconds = opt["total"]["s"]
        line = (
            f"flops     {'x'.join(map(str, shape)):12s} {total / 1e12:.3f} TFLOP in {seconds:.2f} s = "
            f"{total / seconds / 1e12:.2f} TFLOP/s"
        )
        if device.type == "cuda":
            peak = next((v for k, v in BF16_PEAK.items() if k in card), None)
            measured = matmul_rate(device)
            flops["matmul_bf16_flops_per_s"] = measured
            line += f"; bf16 matmul measured {measured / 1e12:.0f} TFLOP/s"
            if peak:
                line += f"; {100 * total / seconds / peak:.1f}% of the {peak / 1e12:.0f} TFLOP/s spec peak"
        print(line)
        results["flops"] = flops
    save(args.json, results)


def save(path: str | None, results: dict) -> None:
    if path:
        write_json(path, results)


if __name__ == "__main__":
    main()
