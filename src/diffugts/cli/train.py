"""`diffugts train`: the project's training recipes (the demo model, and each head alone)."""

from __future__ import annotations

from pathlib import Path

DEMO_CONFIGS = ("demo", "demo-2d")  # configurations with a training recipe


def register(sub) -> None:
    p = sub.add_parser("train", help="train the demo backbone or the trainable heads on the phantom world")
    t = p.add_subparsers(dest="train_command", metavar="WHAT", required=True)

    b = t.add_parser("backbone", help="demo VAE + denoiser (healthy anatomy), 3D or 2D by --config")
    b.add_argument("--out", required=True, help="package folder to write")
    b.add_argument("--config", default="demo", choices=DEMO_CONFIGS,
                   help="backbone configuration: demo (3D MAISI-like, rectified flow) or demo-2d (diffusers 2D, "
                        "captioned slices, DDPM)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--cases", type=int, default=48)
    b.add_argument("--vae-steps", type=int, default=1500)
    b.add_argument("--denoiser-steps", type=int, default=1500)
    b.set_defaults(func=_backbone)

    a = t.add_parser("aova", help="the anomaly-aware attention head, on seen lesion types only")
    a.add_argument("--model", required=True, help="package with a backbone")
    a.add_argument("--out", default=None, help="write a new package here (default: update --model)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--cases", type=int, default=60)
    a.add_argument("--steps", type=int, default=1200)
    a.add_argument("--dim", type=int, default=64)
    a.add_argument("--synthetic-cases", type=int, default=0,
                   help="extra healthy cases with generic synthetic anomalies painted into seen organs "
                        "(default 0, as in the demo recipe)")
    a.add_argument("--randomised-cases", type=int, default=20,
                   help="copies of seen cases with random per-tissue intensities (modality-robust grounding; "
                        "default 20, as in the demo recipe)")
    a.add_argument("--mr-healthy-cases", type=int, default=8,
                   help="lesion-free MR phantoms for region grounding (MR lesions stay unseen; default 8)")
    a.add_argument("--fusion-recall", type=float, default=0.85,
                   help="fuse the coarse map with the organ-relative deviation, its threshold keeping this share "
                        "of the training lesion voxels (default 0.85); 0: the head's own map, no fusion")
    a.add_argument("--features", default=None,
                   help="comma-separated backbone feature maps (default: the demo recipe's, or every scale but the "
                        "finest for backbones without them)")
    a.set_defaults(func=_aova)

    r = t.add_parser("refine", help="the residual refinement head, on seen lesion types only")
    r.add_argument("--model", required=True, help="package with a backbone and an AOVA head")
    r.add_argument("--out", default=None, help="write a new package here (default: update --model)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--cases", type=int, default=40)
    r.add_argument("--steps", type=int, default=1200)
    r.add_argument("--healthy-cases", type=int, default=12,
                   help="lesion-free cases whose coarse candidates teach the head to answer 'nothing' (default 12)")
    r.set_defaults(func=_refine)

    v = t.add_parser("verifier", help="the lesion verifier: keeps or drops each refined lesion (after `train refine`)")
    v.add_argument("--model", required=True, help="package with a fused AOVA head and a refinement head")
    v.add_argument("--out", default=None, help="write a new package here (default: update --model)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--cases", type=int, default=12, help="seen-type cases the refinement head never saw (default 12)")
    v.add_argument("--healthy-cases", type=int, default=6, help="lesion-free cases (default 6)")
    v.set_defaults(func=_verifier)

    d = t.add_parser("demo", help="the whole demo model (what `make demo-model` runs)")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--config", default="demo", choices=DEMO_CONFIGS,
                   help="demo (3D, the shipped model) or demo-2d (the 2D diffusers family; docs/backbones-2d.md)")
    d.add_argument("--quick", action="store_true", help="a few minutes, for smoke tests (not the shipped model)")
    d.add_argument("--backbone", default=None, metavar="PACKAGE",
                   help="reuse this package's trained backbone and train the heads only (the recipe's backbone "
                        "stage is skipped; its provenance is kept)")
    d.set_defaults(func=_demo)


def _backbone(args) -> int:
    from diffugts.train.run import train_backbone

    pkg = train_backbone(Path(args.out), args.config, args.seed, args.cases, args.vae_steps, args.denoiser_steps,
                         not args.quiet)
    print(f"wrote {pkg.root}")
    return 0


def _aova(args) -> int:
    from diffugts.train.run import train_aova_head

    features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
    pkg = train_aova_head(args.model, Path(args.out) if args.out else None, args.seed, args.cases, args.steps,
                          args.dim, features, show_progress=not args.quiet, synthetic_cases=args.synthetic_cases,
                          randomised_cases=args.randomised_cases, mr_healthy_cases=args.mr_healthy_cases,
                          fusion_recall=args.fusion_recall or None)
    dice = pkg.manifest["provenance"]["aova_training"]["held_out_seen_dice"]
    print(f"wrote {pkg.root} (held-out seen Dice of the coarse map: {dice})")
    return 0


def _refine(args) -> int:
    from diffugts.train.run import train_refine_head

    pkg = train_refine_head(args.model, Path(args.out) if args.out else None, args.seed, args.cases, args.steps,
                            show_progress=not args.quiet, healthy_cases=args.healthy_cases)
    dice = pkg.manifest["provenance"]["refine_training"]["held_out_seen_dice"]
    print(f"wrote {pkg.root} (held-out seen Dice of the refined mask: {dice})")
    return 0


def _verifier(args) -> int:
    from diffugts.train.run import train_lesion_verifier

    pkg = train_lesion_verifier(args.model, Path(args.out) if args.out else None, args.seed, args.cases,
                                args.healthy_cases, show_progress=not args.quiet)
    r = pkg.manifest["provenance"]["verifier_training"]
    if "not_fitted" in r:
        print(f"wrote {pkg.root} without a lesion verifier: {r['not_fitted']}")
        return 0
    print(f"wrote {pkg.root} (fitting cases: {r['kept_false_components']} of {r['components'] - r['lesion_components']} "
          f"false lesions kept, {r['kept_lesion_components']} of {r['lesion_components']} true; pooled Dice "
          f"{r['dice_before']} -> {r['dice_after']})")
    return 0


def _demo(args) -> int:
    from diffugts.train.recipe import recipe_for
    from diffugts.train.run import train_demo

    recipe = recipe_for(args.config, args.quick, args.seed)
    pkg = train_demo(Path(args.out), recipe, show_progress=not args.quiet, backbone=args.backbone)
    print(f"wrote {pkg.root} in {pkg.manifest['provenance']['total_seconds']:.0f} s")
    return 0
