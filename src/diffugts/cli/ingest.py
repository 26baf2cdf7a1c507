"""`diffugts ingest`: DICOM folder / zip / s3:// prefix -> study artifact."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "ingest",
        help="select and read one CT/MR series into a study artifact",
        description="Scan a DICOM folder, .zip or s3:// prefix, select one CT/MR series with the "
        "rules, validate its geometry and write OUT/volume.nii, OUT/series.json, OUT/headers/ and "
        "OUT/rejections.json. Exit 2 with a one-line reason when nothing can be ingested.",
    )
    p.add_argument("input", help="DICOM folder, DICOM file, .zip file, or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="output directory (the study artifact)")
    p.add_argument(
        "--rules",
        default="default",
        help="selection rules: 'default', 'permissive' (single slices, any orientation), "
        "or a JSON file (see docs/ingestion.md)",
    )
    p.add_argument(
        "--resample",
        action="store_true",
        help="resample gantry-tilted or oblique series to an orthogonal / axis-aligned grid instead of rejecting them",
    )
    p.add_argument(
        "--spacing-tolerance",
        type=float,
        default=0.05,
        help="allowed relative deviation of slice steps from the median (default 0.05)",
    )
    p.add_argument(
        "--oblique-tolerance", type=float, default=5.0, help="degrees of obliquity stored exactly as is (default 5)"
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    from diffugts.stages.ingest import ingest

    result = ingest(
        args.input,
        args.out,
        rules=args.rules,
        resample_grid=args.resample,
        spacing_tolerance=args.spacing_tolerance,
        oblique_tolerance_deg=args.oblique_tolerance,
        show_progress=not args.quiet,
    )
    print(f"{result.summary} -> {result.out_dir}")
    return 0
