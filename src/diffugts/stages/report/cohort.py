"""The cohort report: one row per study (done / failed with its reason), one per lesion.

Inputs are report folders (``report.json``), folders where a stage recorded its failure
(``failed.json``, see :func:`write_failure`), or ``s3://`` prefixes searched for both.
Outputs: ``cohort.csv``, ``lesions.csv``, ``cohort.html`` (self-contained) and
``cohort.json`` (written last). Studies are named by their study key, as in the per-study
reports; the CSV's ``source`` column says where each result lives (under the results
bucket that path holds the Study Instance UID); the HTML leaves it out.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import os
import posixpath
from pathlib import Path
from typing import Any

import numpy as np

from diffugts import __version__
from diffugts.artifacts import report as report_artifact
from diffugts.errors import DiffugtsError
from diffugts.utils import atomic
from diffugts.utils.prometheus import reason_for

FAILED_MARKER = report_artifact.FAILED_MARKER
STUDY_COLUMNS = [
    "study_key",
    "status",
    "reason_code",
    "reason",
    "modality",
    "prompts",
    "lesions",
    "total_volume_ml",
    "largest_lesion_ml",
    "longest_diameter_mm",
    "max_anomaly_score",
    "source",
]
LESION_COLUMNS = [
    "study_key",
    "lesion",
    "prompt",
    "organ",
    "volume_ml",
    "longest_axial_diameter_mm",
    "mean_intensity",
    "intensity_units",
    "confidence",
    "centroid_x_mm",
    "centroid_y_mm",
    "centroid_z_mm",
]


def write_failure(out_dir: str | os.PathLike, stage: str, exc: BaseException, study_key: str | None = None) -> dict:
    """Record that ``stage`` failed for a study (one line, a reason code), for the cohort."""
    record = {
        "stage": stage,
        "status": "failed",
        "reason_code": reason_for(exc),
        "reason": reason_text(exc),
        "study_key": study_key,
        "diffugts_version": __version__,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic.write_json(Path(out_dir) / FAILED_MARKER, record)
    return record


def reason_text(exc: BaseException) -> str:
    """One line; an input's path is left out (folder names can hold patient names)."""
    if not isinstance(exc, DiffugtsError):
        return type(exc).__name__
    return " ".join(str(getattr(exc, "reason", exc)).split())[:300]


def collect(sources: list[str]) -> list[tuple[str, dict]]:
    """(source, report.json or failed.json content) for every result found."""
    found: list[tuple[str, dict]] = []
    for src in sources:
        if str(src).startswith("s3://"):
            found += _collect_s3(str(src))
            continue
        root = Path(src)
        for marker in (report_artifact.MARKER, FAILED_MARKER):
            if (root / marker).is_file():
                found.append((str(root), _load(root / marker)))
                break
        else:
            found.append(
                (
                    str(root),
                    {
                        "status": "failed",
                        "reason_code": "internal",
                        "reason": "no report.json: the study did not reach the end of the pipeline",
                    },
                )
            )
    return found


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"status": "failed", "reason_code": "internal", "reason": f"unreadable {path.name}: {err}"[:200]}


def _collect_s3(prefix: str) -> list[tuple[str, dict]]:
    from diffugts.storage import ObjectStore

    store = ObjectStore()
    out = []
    for uri in store.list(prefix):
        if uri.endswith("/report.json") or uri.endswith("/" + FAILED_MARKER):
            out.append((uri.rsplit("/", 1)[0], json.loads(store.get_bytes(uri))))
    return out


def study_row(source: str, rec: dict) -> dict:
    row: dict[str, Any] = dict.fromkeys(STUDY_COLUMNS, "")
    row["source"] = source
    row["study_key"] = rec.get("study", {}).get("study_key") or rec.get("study_key") or ""
    if rec.get("status") != "done":
        row.update(status="failed", reason_code=rec.get("reason_code", "internal"), reason=rec.get("reason", ""))
        return row
    lesions = rec.get("lesions", [])
    volumes = [les["volume_ml"] for les in lesions]
    scores = [t["score"] for t in rec.get("targets", []) if t.get("score") is not None]
    row.update(
        status="done",
        modality=rec["study"].get("modality", ""),
        prompts="; ".join(t["text"] for t in rec.get("targets", [])),
        lesions=len(lesions),
        total_volume_ml=round(sum(volumes), 3),
        largest_lesion_ml=max(volumes, default=0.0),
        longest_diameter_mm=max((les["longest_axial_diameter_mm"] for les in lesions), default=0.0),
        max_anomaly_score=max(scores) if scores else "",
    )
    return row


def lesion_rows(rec: dict) -> list[dict]:
    if rec.get("status") != "done":
        return []
    key = rec["study"].get("study_key", "")
    targets = rec.get("targets", [])
    rows = []
    for les in rec.get("lesions", []):
        t = targets[les["target"]] if les.get("target") is not None and les["target"] < len(targets) else {}
        x, y, z = les["centroid_lps_mm"]
        rows.append(
            {
                "study_key": key,
                "lesion": les["id"],
                "prompt": t.get("text", ""),
                "organ": t.get("organ") or "",
                "volume_ml": les["volume_ml"],
                "longest_axial_diameter_mm": les["longest_axial_diameter_mm"],
                "mean_intensity": les.get("mean_intensity", ""),
                "intensity_units": les.get("intensity_units", ""),
                "confidence": les.get("confidence", ""),
                "centroid_x_mm": x,
                "centroid_y_mm": y,
                "centroid_z_mm": z,
            }
        )
    return rows


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def cohort_report(sources: list[str], out_dir: str | os.PathLike, link_base: str | None = None) -> dict:
    """cohort.csv, lesions.csv and cohort.html of these report / failure folders in ``out_dir``.
    ``link_base``: where cohort.html is published; study keys link to each study's report
    relative to it."""
    found = collect(sources)
    studies = [study_row(src, rec) for src, rec in found]
    lesions = [row for _, rec in found for row in lesion_rows(rec)]
    done = [r for r in studies if r["status"] == "done"]
    reasons: dict[str, int] = {}
    for r in studies:
        if r["status"] != "done":
            reasons[r["reason_code"]] = reasons.get(r["reason_code"], 0) + 1
    summary = {
        "stage": "cohort-report",
        "diffugts_version": __version__,
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "studies": len(studies),
        "done": len(done),
        "failed": len(studies) - len(done),
        "failure_reasons": reasons,
        "lesions": len(lesions),
        "studies_with_lesions": sum(1 for r in done if r["lesions"]),
        "total_volume_ml": round(sum(float(r["volume_ml"]) for r in lesions), 3),
        "files": {"studies": "cohort.csv", "lesions": "lesions.csv", "html": "cohort.html"},
    }
    with atomic.staging_dir(Path(out_dir), marker="cohort.json") as stage:
        (stage / "cohort.csv").write_text(_csv(studies, STUDY_COLUMNS))
        (stage / "lesions.csv").write_text(_csv(lesions, LESION_COLUMNS))
        (stage / "cohort.html").write_text(_html(summary, studies, lesions, link_base))
        atomic.write_json(stage / "cohort.json", summary)
    return summary


def volume_figure(volumes: list[float]):
    """Histogram of lesion volumes with plain-number ticks: a log axis only when the volumes
    span more than a factor of 20 (else one lesion's axis read "9.12x10^0"), whole-number
    counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    v = np.asarray(volumes, dtype=float)
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    low, high = max(float(v.min()), 1e-3), max(float(v.max()), 1e-3)
    if high / low > 20:
        ax.hist(
            v, bins=np.logspace(np.log10(low), np.log10(high * 1.01), 20).tolist(), color="#3a78b5", edgecolor="white"
        )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        pad = max(0.5 * (high - low), 0.1 * high, 0.05)
        ax.hist(v, bins=np.linspace(max(low - pad, 0.0), high + pad, 11).tolist(), color="#3a78b5", edgecolor="white")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("lesion volume (mL)")
    ax.set_ylabel("lesions")
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def _volume_histogram(lesions: list[dict]) -> str | None:
    if not lesions:
        return None
    import matplotlib.pyplot as plt

    fig = volume_figure([float(r["volume_ml"]) for r in lesions])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _order(row: dict) -> tuple:
    """Findings first (most lesions, then largest volume), then failures, then the rest."""
    if row["status"] != "done":
        return (1, 0.0, 0.0)
    if row["lesions"]:
        return (0, -float(row["lesions"]), -float(row["total_volume_ml"] or 0))
    return (2, 0.0, 0.0)


def _link(source: str, link_base: str | None) -> str | None:
    """Where a study's own report is, relative to the published cohort report (both local or
    both in one bucket), else None."""
    if not link_base:
        return None
    target = f"{source.rstrip('/')}/report.html"
    if source.startswith("s3://") and link_base.startswith("s3://"):
        bucket, key = source[5:].split("/", 1)
        base_bucket, base_key = link_base[5:].split("/", 1)
        if bucket != base_bucket:
            return None
        return posixpath.relpath(f"{key.rstrip('/')}/report.html", base_key.rstrip("/"))
    if source.startswith("s3://") or link_base.startswith("s3://"):
        return None
    return os.path.relpath(target, link_base)


def _html(summary: dict, studies: list[dict], lesions: list[dict], link_base: str | None = None) -> str:
    from diffugts.stages.report.human import DISCLAIMER

    e = html.escape
    css = (
        "body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;"
        "padding:0 16px;color:#1d2530}table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #d6dbe1;"
        "padding:3px 7px;text-align:left}th{background:#f1f4f7}tr.failed td{background:#fdecec}"
        "tr.found td{background:#fff8e1}h2{font-size:18px;border-bottom:1px solid #d6dbe1}"
        ".note{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;font-size:13px}"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>DiffuGTS cohort report</title>',
        f"<style>{css}</style></head><body><h1>DiffuGTS cohort report</h1>",
        f'<p class="note">{e(DISCLAIMER)}</p>',
        f"<p>{summary['studies']} studies: {summary['done']} done, {summary['failed']} failed; "
        f"{summary['lesions']} lesions in {summary['studies_with_lesions']} studies "
        f"({summary['total_volume_ml']:.1f} mL). Generated {e(summary['generated'])}, diffugts "
        f"{e(summary['diffugts_version'])}.</p>",
    ]
    if summary["failure_reasons"]:
        parts.append(
            "<p>Failures: " + ", ".join(f"{e(k)}: {v}" for k, v in sorted(summary["failure_reasons"].items())) + "</p>"
        )
    hist = _volume_histogram(lesions)
    if hist:
        parts.append(f'<img alt="lesion volume histogram" src="data:image/png;base64,{hist}">')
    columns = [c for c in STUDY_COLUMNS if c != "source"]
    parts += [
        "<h2>Studies</h2>",
        "<p>Studies with findings first, then failed studies with the reason, then "
        "studies without findings. The study key opens the study's own report.</p>",
        "<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>",
    ]
    for r in sorted(studies, key=_order):
        cls = ' class="failed"' if r["status"] != "done" else (' class="found"' if r["lesions"] else "")
        cells = []
        for c in columns:
            text = e(str(r[c]))
            href = _link(r["source"], link_base) if c == "study_key" and r["status"] == "done" else None
            cells.append(f'<td><a href="{e(href)}">{text}</a></td>' if href else f"<td>{text}</td>")
        parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"
