"""`diffugts models`: create, import and verify model packages."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("models", help="create, import and verify model packages")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    v = msub.add_parser("verify", help="check every checksum and load every network strictly")
    v.add_argument("model", help="model package folder, s3:// prefix, or demo / demo-2d")
    v.set_defaults(func=_verify)

    i = msub.add_parser("import-maisi", help="convert the official MAISI bundle checkpoints to a package")
    i.add_argument("bundle", help="MAISI bundle folder (holding models/*.pt)")
    i.add_argument("--out", required=True, help="package folder to write")
    i.add_argument(
        "--config",
        choices=["maisi-ct", "maisi-ct-v1"],
        default=None,
        help="network configuration (default: recognised from the checkpoint)",
    )
    i.add_argument("--vae", help="VAE checkpoint, relative to the bundle (default: official names)")
    i.add_argument("--unet", help="diffusion UNet checkpoint, relative to the bundle")
    i.set_defaults(func=_import)

    d = msub.add_parser("import-diffusers", help="convert a diffusers text-to-image model folder (2D family)")
    d.add_argument("folder", help="diffusers folder (unet/, vae/, scheduler/, text_encoder/, tokenizer/)")
    d.add_argument("--out", required=True, help="package folder to write")
    d.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(1.0, 1.0, 2.5),
        metavar=("X", "Y", "Z"),
        help="model grid spacing in mm (in-plane: the model's training pixel size)",
    )
    d.add_argument(
        "--sampler",
        choices=["ddim", "native"],
        default="ddim",
        help="inpainting with DDIM over the model's betas, or with its own scheduler",
    )
    d.add_argument("--prompt", default="", help="conditioning text of the denoiser (default: empty)")
    d.add_argument(
        "--context-slices",
        type=int,
        default=0,
        help="neighbouring slices on each side as VAE input channels (needs 2n+1 channels)",
    )
    d.set_defaults(func=_import_diffusers)

    c = msub.add_parser("create", help="a package with random backbone weights (benchmarks, tests)")
    c.add_argument("--config", default="demo", help="demo, demo-2d, maisi-ct or maisi-ct-v1")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True)
    c.set_defaults(func=_create)


def _verify(args) -> int:
    from diffugts.models.create import verify

    pkg = verify(args.model)
    nets = ", ".join(pkg.manifest["networks"])
    print(f"{args.model}: OK ({pkg.name}, {pkg.family}, networks: {nets}, {len(pkg.manifest['files'])} files)")
    return 0


def _import(args) -> int:
    from diffugts.models.create import import_maisi

    pkg = import_maisi(Path(args.bundle), Path(args.out), args.config, args.vae, args.unet)
    print(
        f"wrote {pkg.root} ({pkg.manifest['backbone']['config']}, "
        f"scale factor {pkg.manifest['backbone']['scale_factor']:.6g})"
    )
    return 0


def _create(args) -> int:
    from diffugts.models.create import create_random

    pkg = create_random(Path(args.out), args.config, args.seed)
    print(f"wrote {pkg.root} ({args.config}, random weights, seed {args.seed})")
    return 0


def _import_diffusers(args) -> int:
    from diffugts.models.diffusers_import import import_diffusers

    pkg = import_diffusers(
        Path(args.folder),
        Path(args.out),
        spacing_mm=args.spacing,
        sampler=args.sampler,
        prompt=args.prompt,
        context_slices=args.context_slices,
    )
    print(
        f"wrote {pkg.root} (diffusers2d, {pkg.manifest['backbone']['scheduler']['class']}, "
        f"{len(pkg.manifest['files'])} files)"
    )
    return 0
