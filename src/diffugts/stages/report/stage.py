"""The reporting stage: ``make_report`` (one study) and ``cohort_report``.

The report folder holds ``seg.dcm`` (absent when nothing was found), ``sr.dcm``,
``pseudo_healthy/*.dcm`` (with a synthesis artifact), ``report.md``, ``summary.md`` (the
same without pictures, for the KFP Markdown view), ``report.html``, ``images/*.png``,
``metrics.json`` and ``report.json``, written last.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import time
from pathlib import Path

from diffugts import __version__
from diffugts.artifacts import (
    attention as attention_artifact,
    lesions as lesions_artifact,
    report as artifact,
    synthesis as synthesis_artifact,
)
from diffugts.artifacts.study import load_study
from diffugts.utils import atomic, prometheus as metrics

log = logging.getLogger(__name__)

MARKER = artifact.MARKER
STAGE = "report"


def study_key(study_uid: str) -> str:
    """Pseudonymous name of a study in human-facing outputs (no UIDs there)."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:16]


def make_report(
    study_dir,
    lesions_dir,
    out_dir,
    *,
    attention_dir=None,
    synthesis_dir=None,
    upload: str | None = None,
    pushgateway: str | None = None,
    max_lesion_pictures: int = 12,
    loaded: dict | None = None,
) -> dict:
    """Write the report folder ``out_dir``; ``upload``: None (no upload), "" (the default
    results bucket) or an ``s3://`` base. Metrics go to ``pushgateway`` (or the environment's
    gateway). A failure is recorded as a rejection there and as ``failed.json`` in
    ``out_dir`` (a stale ``report.json`` is removed, so the study does not look done), then
    re-raised. ``loaded``: artifacts of those folders already in memory (``study``,
    ``lesions``, ``attention``, ``synthesis``: diffugts.artifacts objects), not read again."""
    from diffugts.stages.report.cohort import FAILED_MARKER, write_failure

    out = Path(out_dir)
    try:
        with metrics.timed_stage(STAGE, gateway=pushgateway) as run:
            summary = _make(
                Path(study_dir),
                Path(lesions_dir),
                out,
                attention_dir,
                synthesis_dir,
                upload,
                max_lesion_pictures,
                run,
                loaded or {},
            )
            run["lesions"] = len(summary["lesions"])
    except Exception as exc:
        (out / MARKER).unlink(missing_ok=True)
        write_failure(out, STAGE, exc)
        raise
    (out / FAILED_MARKER).unlink(missing_ok=True)
    return summary


def _make(
    study_dir: Path,
    lesions_dir: Path,
    out: Path,
    attention_dir,
    synthesis_dir,
    upload,
    max_pictures,
    run: dict,
    loaded: dict,
) -> dict:
    from diffugts.stages.report import derived, human, seg as seg_mod, sr as sr_mod

    t0 = time.perf_counter()
    study = loaded.get("study") or load_study(study_dir)
    lesions = loaded.get("lesions") or lesions_artifact.read(lesions_dir, study.geometry)
    attention = loaded.get("attention") if attention_dir else None
    if attention_dir and attention is None:
        attention = attention_artifact.read(attention_dir, study.geometry, masks=False, organs=False)
    synthesis = loaded.get("synthesis") if synthesis_dir else None
    if synthesis_dir and synthesis is None:
        synthesis = synthesis_artifact.read(synthesis_dir, study.geometry, inpainted=False)
    model = dict(lesions.summary.get("model") or (attention.summary.get("model") if attention else None) or {})
    run["model"] = {"name": _label_safe(model.get("name")), "sha256": _label_safe(model.get("sha256"))}
    s = study.series
    lesions_sha = hashlib.sha256((lesions_dir / lesions_artifact.MARKER).read_bytes()).hexdigest()
    entropy = [s["series_instance_uid"], lesions_sha, __version__]
    ctx = context(study, lesions, attention, model)
    masks = lesions.lesion_masks(study.geometry)
    notes: list[str] = []
    t_load = time.perf_counter()

    sources = seg_mod.source_images(study)
    infos = seg_mod.segment_infos(lesions.records, lesions.targets, entropy)
    seg = seg_mod.build_seg(study, sources, masks, infos, lesions.targets, model, entropy) if infos else None
    if seg is None:
        notes.append("No lesions: no DICOM SEG was written; the SR records each prompt's finding as absent.")
    sr = sr_mod.build_sr(study, sources, seg, infos, lesions.records, lesions.targets, model, entropy)
    seg_of = {i.lesion_id: i.segment_number for i in infos}
    t_dicom = time.perf_counter()

    pictures = human.make_pictures(ctx, study.volume, study.geometry, masks, attention, synthesis, max_pictures)
    if len(ctx["lesions"]) > max_pictures:
        notes.append(f"Pictures show the {max_pictures} largest of {len(ctx['lesions'])} lesions.")
    t_pictures = time.perf_counter()

    base = None if upload is None else upload or ""
    upload_uri = None
    if base is not None:
        from diffugts.stages.report.upload import results_prefix

        upload_uri = results_prefix(s["study_instance_uid"], base or None)
    why_not_derived = derived.derived_possible(study) if synthesis is not None else None
    if why_not_derived:
        notes.append(f"No pseudo-healthy DICOM series: {why_not_derived}.")
    ctx["notes"] = notes

    with atomic.staging_dir(out, marker=MARKER) as stage:
        files: dict = {
            "markdown": "report.md",
            "summary": "summary.md",
            "html": "report.html",
            "metrics": "metrics.json",
            "seg": None,
            "pseudo_healthy_series": None,
        }
        if seg is not None:
            seg.save_as(stage / "seg.dcm")
            files["seg"] = "seg.dcm"
        sr.save_as(stage / "sr.dcm")
        files["sr"] = "sr.dcm"
        dicom = {"seg": _ids(seg, segments=len(infos)), "sr": _ids(sr), "pseudo_healthy": None}
        if synthesis is not None and not why_not_derived:
            paths = derived.write_pseudo_healthy_series(
                stage / "pseudo_healthy", study, synthesis.pseudo_healthy, model, entropy
            )
            files["pseudo_healthy_series"] = "pseudo_healthy/"
            dicom["pseudo_healthy"] = {
                "series_instance_uid": seg_mod.uid(entropy, "pseudo-healthy-series"),
                "instances": len(paths),
            }
        (stage / "images").mkdir()
        for p in pictures:
            (stage / "images" / p.name).write_bytes(p.png)
        files["images"] = [f"images/{p.name}" for p in pictures]
        (stage / "report.md").write_text(human.markdown(ctx, pictures))
        (stage / "summary.md").write_text(human.markdown(ctx, pictures, image_dir=None))
        (stage / "report.html").write_text(human.html_report(ctx, pictures))
        kfp_metrics = kfp_metric_values(ctx, time.perf_counter() - t0)
        atomic.write_json(stage / "metrics.json", kfp_metrics)
        summary = {
            "stage": STAGE,
            "status": "done",
            "diffugts_version": __version__,
            "generated": ctx["generated"],
            "study": {
                "study_key": ctx["study_key"],
                "study_instance_uid": s["study_instance_uid"],
                "series_instance_uid": s["series_instance_uid"],
                "frame_of_reference_uid": s["frame_of_reference_uid"],
                "modality": study.modality,
            },
            "model": model,
            "targets": ctx["targets"],
            "lesions": [{**rec, "segment_number": seg_of.get(rec["id"])} for rec in ctx["lesions"]],
            "files": files,
            "dicom": dicom,
            "notes": notes,
            "upload": {"uri": upload_uri} if upload_uri else None,
            "timings_s": {
                "load": round(t_load - t0, 3),
                "dicom": round(t_dicom - t_load, 3),
                "pictures": round(t_pictures - t_dicom, 3),
                "total": round(time.perf_counter() - t0, 3),
            },
        }
        atomic.write_json(stage / MARKER, summary)
    if upload_uri:
        from diffugts.stages.report.upload import upload_report

        upload_report(out, s["study_instance_uid"], base or None, meta={"lesions": len(ctx["lesions"])})
        log.info("report published to %s", upload_uri)
    return summary


def _ids(ds, **extra) -> dict | None:
    if ds is None:
        return None
    return {"sop_instance_uid": str(ds.SOPInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID), **extra}


def _label_safe(value) -> str:
    """A model name / sha256 as a metric label (anything odd becomes 'other')."""
    value = str(value or "none")
    return value if re.match(r"^[A-Za-z0-9_.+:-]{1,128}$", value) else "other"


def context(study, lesions, attention, model: dict) -> dict:
    """What the human report shows: no patient identifiers, no UIDs."""
    g = study.geometry
    records = sorted(lesions.records, key=lambda r: r["id"])
    records = _located(records, lesions.targets, study) if records else records
    targets = []
    for n, t in enumerate(lesions.targets):
        prompt = t.get("prompt", {})
        index = t.get("index", n)
        score = t.get("score")
        if score is None and attention is not None:
            found = attention.for_prompt(prompt.get("text", ""), index)
            score = found[0].get("score") if found else None
        ids = list(t.get("lesion_ids", []))
        targets.append(
            {
                "index": index,
                "text": prompt.get("text", f"target {index}"),
                "organ": prompt.get("organ"),
                "score": score,
                "lesion_ids": ids,
                "total_volume_ml": round(sum(r["volume_ml"] for r in records if r["id"] in ids), 3),
            }
        )
    size = "x".join(str(v) for v in g.shape[::-1])
    spacing = "x".join(f"{v:.2f}" for v in g.spacing)
    return {
        "study_key": study_key(study.series["study_instance_uid"]),
        "modality": study.modality,
        "study": {
            "modality": study.modality,
            "orientation": study.series.get("orientation", "unknown"),
            "size": size,
            "spacing": spacing,
        },
        "model": model,
        "version": __version__,
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "targets": targets,
        "lesions": records,
    }


def _located(records: list[dict], targets: list[dict], study) -> list[dict]:
    """Each lesion with its site ("left kidney") and the source slice to open in PACS."""
    from diffugts.stages.report import location

    midline = location.body_midline_x(study.volume, study.geometry, study.modality)
    slices = location.Slices(study)
    out = []
    for rec in records:
        organ = targets[rec["target"]].get("prompt", {}).get("organ") if rec.get("target") is not None else None
        lesion_side = location.side(organ, rec["centroid_lps_mm"], midline)
        out.append(
            {**rec, "side": lesion_side, "site": location.site(organ, lesion_side), "source_slice": slices.label(rec)}
        )
    return out


def kfp_metric_values(ctx: dict, seconds: float) -> dict:
    """Flat name -> number, for ``dsl.Metrics.log_metric`` in the component."""
    lesions = ctx["lesions"]
    out = {
        "lesions": len(lesions),
        "total_volume_ml": round(sum(r["volume_ml"] for r in lesions), 3),
        "largest_lesion_ml": max((r["volume_ml"] for r in lesions), default=0.0),
        "longest_diameter_mm": max((r["longest_axial_diameter_mm"] for r in lesions), default=0.0),
        "report_seconds": round(seconds, 3),
    }
    for t in ctx["targets"]:
        name = re.sub(r"[^a-z0-9]+", "_", t["text"].lower()).strip("_")[:40]
        out[f"lesions_{t['index']:02d}_{name}"] = len(t["lesion_ids"])
        if t.get("score") is not None:
            out[f"score_{t['index']:02d}_{name}"] = float(t["score"])
    return out


def cohort_report(sources, out_dir, link_base: str | None = None) -> dict:
    from diffugts.stages.report.cohort import cohort_report as run

    return run([os.fspath(s) for s in sources], out_dir, link_base)
