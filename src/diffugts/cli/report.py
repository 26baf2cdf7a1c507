"""`diffugts report` (one study) and `diffugts cohort-report` (many studies)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="DICOM SEG + SR, human report, metrics and upload for one study",
        description="Write OUT/seg.dcm, OUT/sr.dcm, OUT/report.md, OUT/report.html, OUT/images/, "
        "OUT/metrics.json and OUT/report.json (last) from the study and lesion artifacts. "
        "See docs/reporting.md.",
    )
    p.add_argument("--study", required=True, help="study artifact (from `diffugts ingest`)")
    p.add_argument("--lesions", required=True, help="lesion artifact (lesions.json, from refinement)")
    p.add_argument("--attention", help="attention artifact (attention.json): heat-map pictures")
    p.add_argument("--synthesis", help="synthesis artifact (synthesis.json): pseudo-healthy pictures and DICOM series")
    p.add_argument("--out", required=True, help="output directory (the report folder)")
    p.add_argument(
        "--upload",
        nargs="?",
        const="",
        default=None,
        metavar="S3_URI",
        help="publish the folder to S3_URI/<StudyInstanceUID>/report (manifest last); "
        "without a value: s3://$DIFFUGTS_BUCKET",
    )
    p.add_argument(
        "--pushgateway", help="Prometheus Pushgateway URL (default: $DIFFUGTS_PUSHGATEWAY_URL; none: no metrics pushed)"
    )
    p.add_argument("--max-pictures", type=int, default=12, help="lesions pictured, largest first (default 12)")
    p.set_defaults(func=_run)

    c = sub.add_parser(
        "cohort-report",
        help="CSV + HTML over many studies' results",
        description="One row per study (done / failed with its reason) and one per lesion: "
        "OUT/cohort.csv, OUT/lesions.csv, OUT/cohort.html, OUT/cohort.json (last).",
    )
    c.add_argument("results", nargs="+", help="report folders (report.json or failed.json), or s3:// prefixes")
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(func=_run_cohort)


def _run(args) -> int:
    from diffugts.stages.report import make_report

    summary = make_report(
        args.study,
        args.lesions,
        args.out,
        attention_dir=args.attention,
        synthesis_dir=args.synthesis,
        upload=args.upload,
        pushgateway=args.pushgateway,
        max_lesion_pictures=args.max_pictures,
    )
    n = len(summary["lesions"])
    where = f", published to {summary['upload']['uri']}" if summary.get("upload") else ""
    print(f"{n} lesion{'s' if n != 1 else ''} reported -> {args.out}{where}")
    return 0


def _run_cohort(args) -> int:
    from diffugts.stages.report import cohort_report

    summary = cohort_report(args.results, args.out, link_base=str(args.out))  # links relative to cohort.html
    print(
        f"{summary['studies']} studies ({summary['done']} done, {summary['failed']} failed), "
        f"{summary['lesions']} lesions -> {args.out}"
    )
    return 0
