"""The report artifact (stage 5's output): ``seg.dcm`` (absent when nothing was found),
``sr.dcm``, ``pseudo_healthy/*.dcm`` (with a synthesis artifact), ``report.md``,
``summary.md`` (without pictures, for the KFP Markdown view), ``report.html``,
``images/*.png``, ``metrics.json`` and ``report.json`` last; or, where a stage failed for a
study, ``failed.json`` in its place (diffugts.stages.report.cohort)."""

from __future__ import annotations

import os
from pathlib import Path

from diffugts.artifacts.files import check_schema, read_marker

MARKER = "report.json"
FAILED_MARKER = "failed.json"
SCHEMA_VERSION = 1  # written without the field, as attention's (diffugts.artifacts.attention)
FILES = {
    "markdown": "report.md",
    "summary": "summary.md",
    "html": "report.html",
    "metrics": "metrics.json",
    "seg": "seg.dcm",
    "sr": "sr.dcm",
    "pseudo_healthy_series": "pseudo_healthy/",
    "images": "images/",
}


def read(folder: str | os.PathLike) -> dict:
    """report.json of a report folder."""
    root = Path(folder)
    summary = read_marker(root, MARKER, "a report", "run `diffugts report` first")
    check_schema(summary, root / MARKER, SCHEMA_VERSION)
    return summary
