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
from pathlib import Path

import numpy as np

from diffugts import __version__, atomic
from diffugts.errors import DiffugtsError
from diffugts.metrics import reason_for

FAILED_MARKER = "failed.json"
STUDY_COLUMNS = ["study_key", "status", "reason_code", "reason", "modality", "prompts", "lesions",
                 "total_volume_ml", "largest_lesion_ml", "longest_diameter_mm", "max_anomaly_score", "source"]
LESION_COLUMNS = ["study_key", "lesion", "prompt", "organ", "volume_ml", "longest_axial_diameter_mm",
                  "mean_intensity", "intensity_units", "confidence", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]


def write_failure(out_dir: str | os.PathLike, stage: str, exc: BaseException, study_key: str | None = None) -> dict:
    """Record that ``stage`` failed for a study (one line, a reason code), for the cohort."""
    record = {"stage": stage, "status": "failed", "reason_code": reason_for(exc),
              "reason": reason_text(exc),
              "study_key": study_key, "diffugts_version": __version__,
              "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
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
        for marker in ("report.json", FAILED_MARKER):
            if (root / marker).is_file():
                found.append((str(root), _load(root / marker)))
                break
        else:
            found.append((str(root), {"status": "failed", "reason_code": "internal",
                                      "reason": "no report.json: the study did not reach the end of the pipeline"}))
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
    row = dict.fromkeys(STUDY_COLUMNS, "")
    row["source"] = source
    row["study_key"] = rec.get("study", {}).get("study_key") or rec.get("study_key") or ""
    if rec.get("status") != "done":
        row.update(status="failed", reason_code=rec.get("reason_code", "internal"), reason=rec.get("reason", ""))
        return row
    lesions = rec.get("lesions", [])
    volumes = [les["volume_ml"] for les in lesions]
    scores = [t["score"] for t in rec.get("targets", []) if t.get("score") is not None]
    row.update(status="done", modality=rec["study"].get("modality", ""),
               prompts="; ".join(t["text"] for t in rec.get("targets", [])), lesions=len(lesions),
               total_volume_ml=round(sum(volumes), 3), largest_lesion_ml=max(volumes, default=0.0),
               longest_diameter_mm=max((les["longest_axial_diameter_mm"] for les in lesions), default=0.0),
               max_anomaly_score=max(scores) if scores else "")
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
        rows.append({"study_key": key, "lesion": les["id"], "prompt": t.get("text", ""), "organ": t.get("organ") or "",
                     "volume_ml": les["volume_ml"], "longest_axial_diameter_mm": les["longest_axial_diameter_mm"],
                     "mean_intensity": les.get("mean_intensity", ""), "intensity_units": les.get("intensity_units", ""),
                     "confidence": les.get("confidence", ""), "centroid_x_mm": x, "centroid_y_mm": y,
                     "centroid_z_mm": z})
    return rows


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def cohort_report(sources: list[str], out_dir: str | os.PathLike) -> dict:
    found = collect(sources)
    studies = [study_row(src, rec) for src, rec in found]
    lesions = [row for _, rec in found for row in lesion_rows(rec)]
    done = [r for r in studies if r["status"] == "done"]
    reasons: dict[str, int] = {}
    for r in studies:
        if r["status"] != "done":
            reasons[r["reason_code"]] = reasons.get(r["reason_code"], 0) + 1
    summary = {
        "stage": "cohort-report", "diffugts_version": __version__,
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "studies": len(studies), "done": len(done), "failed": len(studies) - len(done), "failure_reasons": reasons,
        "lesions": len(lesions), "studies_with_lesions": sum(1 for r in done if r["lesions"]),
        "total_volume_ml": round(sum(float(r["volume_ml"]) for r in lesions), 3),
        "files": {"studies": "cohort.csv", "lesions": "lesions.csv", "html": "cohort.html"},
    }
    with atomic.staging_dir(Path(out_dir), marker="cohort.json") as stage:
        (stage / "cohort.csv").write_text(_csv(studies, STUDY_COLUMNS))
        (stage / "lesions.csv").write_text(_csv(lesions, LESION_COLUMNS))
        (stage / "cohort.html").write_text(_html(summary, studies, lesions))
        atomic.write_json(stage / "cohort.json", summary)
    return summary


def _volume_histogram(lesions: list[dict]) -> str | None:
    if not lesions:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = np.array([float(r["volume_ml"]) for r in lesions])
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    bins = np.logspace(np.log10(max(volumes.min(), 1e-3)), np.log10(volumes.max() * 1.01 + 1e-3), 20)
    ax.hist(volumes, bins=bins, color="#3a78b5", edgecolor="white")
    ax.set_xscale("log")
    ax.set_xlabel("lesion volume (mL)")
    ax.set_ylabel("lesions")
    ax.spines[["top", "right"]].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _html(summary: dict, studies: list[dict], lesions: list[dict]) -> str:
    e = html.escape
    css = ("body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;"
           "padding:0 16px;color:#1d2530}table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #d6dbe1;"
           "padding:3px 7px;text-align:left}th{background:#f1f4f7}tr.failed td{background:#fdecec}"
           "h2{font-size:18px;border-bottom:1px solid #d6dbe1}")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>DiffuGTS cohort report</title>',
             f"<style>{css}</style></head><body><h1>DiffuGTS cohort report</h1>",
             f"<p>{summary['studies']} studies: {summary['done']} done, {summary['failed']} failed; "
             f"{summary['lesions']} lesions in {summary['studies_with_lesions']} studies "
             f"({summary['total_volume_ml']:.1f} mL). Generated {e(summary['generated'])}, diffugts "
             f"{e(summary['diffugts_version'])}.</p>"]
    if summary["failure_reasons"]:
        parts.append("<p>Failures: " + ", ".join(f"{e(k)}: {v}" for k, v in sorted(summary["failure_reasons"].items()))
                     + "</p>")
    hist = _volume_histogram(lesions)
    if hist:
        parts.append(f'<img alt="lesion volume histogram" src="data:image/png;base64,{hist}">')
    columns = [c for c in STUDY_COLUMNS if c != "source"]
    parts += ["<h2>Studies</h2>", "<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>"]
    for r in studies:
        cls = ' class="failed"' if r["status"] != "done" else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{e(str(r[c]))}</td>" for c in columns) + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"
