"""`diffugts attend`: anomaly-aware open-vocabulary attention maps for a study."""

from __future__ import annotations

from diffugts.config import DEFAULT_SEED, MapMode


def register(sub) -> None:
    p = sub.add_parser(
        "attend",
        help="attention maps and coarse masks for free-text prompts",
        description="Compute, for each prompt, the anomaly probability map and a coarse mask on the "
        "study grid (OUT/maps, OUT/masks) and OUT/attention.json with image-level scores.",
    )
    p.add_argument("study", help="study artifact folder (from `diffugts ingest`)")
    p.add_argument(
        "--model", default=None, help="model package folder, s3:// prefix, or a shipped model: demo (default), demo-2d"
    )
    p.add_argument("--prompt", action="append", required=True, help="target text, e.g. 'liver tumor' (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold of the coarse mask")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: a GPU if present)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the denoiser-feature noise")
    p.add_argument(
        "--maps",
        choices=[m.value for m in MapMode],
        default=MapMode.AOVA.value,
        help="aova: the package's trained AOVA head (default); training-free: the backbone's own "
        "cross-attention maps, abnormal vs normal prompts (2D diffusers packages; no head needed)",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    from diffugts.models.defaults import default_model
    from diffugts.stages.attend import attend

    summary = attend(
        args.study,
        args.model or default_model(),
        args.prompt,
        args.out,
        threshold=args.threshold,
        device=args.device,
        seed=args.seed,
        maps=args.maps,
    )
    for t in summary["targets"]:
        print(
            f"{t['prompt']['text']!r}: score {t['score']:.2f}, coarse mask {t['coarse_volume_ml']:.1f} mL "
            f"-> {args.out}/{t['mask']}"
        )
    return 0
