"""`diffugts segment` (all stages in one process) and `diffugts refine` (stage 4 alone)."""

from __future__ import annotations

from diffugts.config import DEFAULT_MIN_VOLUME_ML, MapMode


def register(sub) -> None:
    s = sub.add_parser(
        "segment",
        help="all stages in one process: DICOM in, masks, lesions, DICOM SEG/SR and report out",
        description="Segment what the prompts describe in one CT/MR study: ingestion, attention maps, "
        "pseudo-healthy synthesis, residual refinement and reporting, without Kubeflow. Writes "
        "OUT/study, OUT/attention, OUT/synthesis, OUT/lesions and OUT/report.",
    )
    s.add_argument("input", help="DICOM folder, .zip, or s3://bucket/prefix")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--prompt", action="append", required=True, help="what to segment, e.g. 'liver tumor' (repeatable)")
    s.add_argument(
        "--model", default=None, help="model package folder, s3:// prefix, or a shipped model: demo (default), demo-2d"
    )
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU if present)")
    s.add_argument("--rules", default="default", help="series selection rules (see `diffugts ingest --help`)")
    s.add_argument("--resample", action="store_true", help="resample tilted / oblique series")
    s.add_argument(
        "--min-volume-ml",
        type=float,
        default=None,
        help=f"drop lesions smaller than this (default {DEFAULT_MIN_VOLUME_ML})",
    )
    add_verifier_threshold(s)
    s.add_argument("--no-report", action="store_true", help="stop after the lesion masks")
    s.add_argument(
        "--maps",
        choices=[m.value for m in MapMode],
        default=MapMode.AOVA.value,
        help="attention maps from the trained AOVA head (default) or the backbone's own text "
        "cross-attention (2D diffusers packages)",
    )
    s.add_argument(
        "--upload",
        nargs="?",
        const="",
        default=None,
        help="upload the report to s3:// (default base: s3://$DIFFUGTS_BUCKET)",
    )
    s.set_defaults(func=_segment)

    r = sub.add_parser("refine", help="residual refinement: refined masks and lesion instances")
    r.add_argument("study", help="study artifact (from `diffugts ingest`)")
    r.add_argument("--attention", required=True, help="attention artifact (from `diffugts attend`)")
    r.add_argument("--synthesis", required=True, help="synthesis artifact (from `diffugts synthesize`)")
    r.add_argument("--model", default=None, help="model package folder, s3:// prefix, or demo (default) / demo-2d")
    r.add_argument("--out", required=True, help="output folder (lesions.json, masks, instances)")
    r.add_argument(
        "--min-volume-ml",
        type=float,
        default=DEFAULT_MIN_VOLUME_ML,
        help=f"drop lesions smaller than this (default {DEFAULT_MIN_VOLUME_ML})",
    )
    add_verifier_threshold(r)
    r.add_argument("--device", default=None)
    r.set_defaults(func=_refine)


def add_verifier_threshold(parser) -> None:
    """``--verifier-threshold`` (diffugts.config.RefineParams.verifier_threshold)."""
    parser.add_argument(
        "--verifier-threshold",
        type=float,
        default=None,
        help="the lesion verifier's operating point: the least probability of being a lesion a "
        "candidate needs to be reported, 0..1 (default: the model's; lower finds more lesions "
        "and more false ones)",
    )


def _segment(args) -> int:
    from diffugts.runners.segment import segment

    result = segment(
        args.input,
        args.out,
        args.prompt,
        model=args.model,
        device=args.device,
        rules=args.rules,
        resample=args.resample,
        min_volume_ml=args.min_volume_ml,
        report=not args.no_report,
        upload=args.upload,
        maps=args.maps,
        show_progress=not args.quiet,
        verifier_threshold=args.verifier_threshold,
    )
    _print_lesions(result["lesions"])
    if "report" in result:
        print(f"report: {args.out}/report/report.html")
    return 0


def _refine(args) -> int:
    from diffugts.models.defaults import default_model
    from diffugts.stages.refine import refine

    summary = refine(
        args.study,
        args.attention,
        args.synthesis,
        args.model or default_model(),
        args.out,
        min_volume_ml=args.min_volume_ml,
        device=args.device,
        verifier_threshold=args.verifier_threshold,
    )
    _print_lesions(summary)
    return 0


def _print_lesions(summary: dict) -> None:
    by_target: dict[int, list[dict]] = {}
    for lesion in summary["lesions"]:
        by_target.setdefault(lesion["target"], []).append(lesion)
    for t in summary["targets"]:
        found = by_target.get(t["index"], [])
        total = sum(les["volume_ml"] for les in found)
        print(f"{t['prompt']['text']!r}: {len(found)} lesion(s), {total:.1f} mL")
        for les in found:
            sure = f", confidence {les['confidence']:.2f}" if "confidence" in les else ""
            print(f"  lesion {les['id']}: {les['volume_ml']:.1f} mL, {les['longest_axial_diameter_mm']:.0f} mm{sure}")
