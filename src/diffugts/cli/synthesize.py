"""`diffugts synthesize`: study + coarse mask -> pseudo-healthy study (latent inpainting)."""

from __future__ import annotations

from diffugts.config import SynthesisParams
from diffugts.errors import ConfigError

DEFAULTS = SynthesisParams()


def register(sub) -> None:
    p = sub.add_parser(
        "synthesize",
        help="pseudo-healthy synthesis: inpaint the coarse mask with the frozen diffusion backbone",
        description="Dilate the coarse mask, regenerate it in the backbone's latent space "
        "(RePaint / blended latent diffusion) and paste the result back: outside the dilated mask "
        "the output equals the input exactly. Writes OUT/pseudo_healthy.nii.gz, OUT/difference.nii.gz "
        "(input - pseudo-healthy), OUT/inpaint_mask.nii.gz and OUT/synthesis.json (last). "
        "See docs/synthesis.md.",
    )
    p.add_argument("study", help="study artifact folder (from `diffugts ingest`)")
    p.add_argument("--model", required=True, help="model package folder, s3:// prefix, or demo / demo-2d")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--attention", help="attention artifact folder: the union of its coarse masks")
    src.add_argument("--mask", help="binary mask NIfTI on the study grid")
    p.add_argument(
        "--target",
        type=int,
        default=None,
        help="with --attention: use only this target's mask (index in attention.json)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--dilation-mm",
        type=float,
        default=DEFAULTS.dilation_mm,
        help=f"grow the mask by this many mm (default {DEFAULTS.dilation_mm:g})",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=DEFAULTS.strength,
        help=f"starting noise level, fraction of the schedule, (0, 1] (default {DEFAULTS.strength:g})",
    )
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"denoising steps (default {DEFAULTS.steps})")
    p.add_argument(
        "--no-harmonise",
        dest="harmonise",
        action="store_false",
        help="keep the generator's intensity as it is (default: shift H by the median x - H of the "
        "regenerated ring around the mask)",
    )
    p.add_argument(
        "--jumps",
        type=int,
        default=DEFAULTS.jumps,
        help=f"RePaint resampling jumps per step (default {DEFAULTS.jumps}; each one costs a full step)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"noise seed (default {DEFAULTS.seed})")
    p.add_argument(
        "--context-mm",
        type=float,
        default=DEFAULTS.context_mm,
        help=f"context around the mask given to the denoiser (default {DEFAULTS.context_mm:g})",
    )
    p.add_argument(
        "--feather-mm",
        type=float,
        default=DEFAULTS.feather_mm,
        help=f"paste-back ramp inside the dilated mask's border (default {DEFAULTS.feather_mm:g}; 0 = hard edge)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="tile side in model voxels for large regions (default: the package's roi_size)",
    )
    p.add_argument(
        "--ground-truth",
        metavar="CASE",
        help="phantom case folder or case.json: add fidelity figures to synthesis.json",
    )
    p.add_argument("--lesion-mask", help="ground truth lesion mask / ids NIfTI (with --organ-mask)")
    p.add_argument("--organ-mask", help="ground truth organ label NIfTI (with --lesion-mask)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_run)


def _truth(args):
    """The ground truth argument for synthesize(): a phantom case path or label maps."""
    if not (args.lesion_mask or args.organ_mask):
        return args.ground_truth
    if args.ground_truth:
        raise ConfigError("give either --ground-truth or --lesion-mask with --organ-mask, not both")
    if not (args.lesion_mask and args.organ_mask):
        raise ConfigError("--lesion-mask and --organ-mask go together")
    from diffugts.artifacts.files import read_on_grid
    from diffugts.artifacts.study import load_study
    from diffugts.stages.synthesize import mask_truth

    geometry = load_study(args.study).geometry
    return mask_truth(
        read_on_grid(args.lesion_mask, geometry, "lesion mask"),
        read_on_grid(args.organ_mask, geometry, "organ mask"),
        source=args.lesion_mask,
    )


def _run(args) -> int:
    from diffugts.config import SynthesisParams
    from diffugts.stages.synthesize import synthesize

    if args.target is not None and not args.attention:
        raise ConfigError("--target needs --attention")
    params = SynthesisParams(
        dilation_mm=args.dilation_mm,
        strength=args.strength,
        steps=args.steps,
        jumps=args.jumps,
        harmonise=args.harmonise,
        seed=args.seed,
        context_mm=args.context_mm,
        feather_mm=args.feather_mm,
        tile=args.tile,
    )
    params.validate()
    truth = _truth(args)
    summary = synthesize(
        args.study,
        args.model,
        args.out,
        mask=args.mask,
        attention=args.attention,
        target=args.target,
        params=params,
        ground_truth=truth,
        device=args.device,
        show_progress=not args.quiet,
    )
    m = summary["mask"]
    if summary["nothing_to_inpaint"]:
        print(f"{summary['note']} -> {args.out}")
        return 0
    seconds = sum(summary["timings_s"].values())
    line = f"inpainted {m['dilated_ml']:.1f} mL (coarse {m['coarse_ml']:.1f} mL) in {seconds:.1f} s"
    fid = summary.get("fidelity")
    if fid and fid.get("mean_fidelity") is not None:
        line += f", mean fidelity {fid['mean_fidelity']:.2f}"
    print(f"{line} -> {args.out}")
    return 0
