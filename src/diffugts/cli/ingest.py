"""`diffugts ingest`: DICOM folder / zip / s3:// prefix -> study artifact."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("ingest", help="select and read one CT/MR series into a study artifact")
    p.add_argument("input", help="DICOM folder, .zip file, or s3://bucket/prefix")
    p.set_defaults(func=_run)


def _run(args) -> int:
    raise NotImplementedError
