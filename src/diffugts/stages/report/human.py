"""The human report: Markdown (pictures as files) and self-contained HTML (pictures inline).

It is for the clinician or researcher reading results, so it carries no patient name, ID,
birth date, study date or UIDs: the study is named by its pseudonymous key (a hash of the
Study Instance UID), which is also the key of the cohort report. The DICOM objects carry
the identifiers.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

import numpy as np

from diffugts.stages.report import pictures as pic
from diffugts.stages.report.seg import lesion_colour
from diffugts.utils.markdown import md

DISCLAIMER = "Research use only. Automatic zero-shot segmentation: not reviewed, not for diagnosis."


@dataclass
class Picture:
    name: str  # file name under images/
    section: str  # "lesions", "attention", "synthesis"
    title: str
    png: bytes


def make_pictures(
    ctx: dict, volume, geometry, masks: dict, attention=None, synthesis=None, max_lesions: int = 12
) -> list[Picture]:
    """Pictures for the lesions (largest first, at most ``max_lesions``), each prompt's
    attention map, and original vs pseudo-healthy for each pictured lesion."""
    orient = pic.Orientation(geometry)
    vol = orient(volume)
    out: list[Picture] = []
    targets = ctx["targets"]
    shown = sorted(ctx["lesions"], key=lambda r: -r["volume_ml"])[:max_lesions]
    healthy = orient(synthesis.pseudo_healthy) if synthesis is not None else None
    windows: dict = {}  # MR windows come from percentiles of the whole volume: once

    def window(organ):
        key = organ if ctx["modality"] == "CT" else None
        if key not in windows:
            windows[key] = pic.window_for(ctx["modality"], organ, vol)
        return windows[key]

    for rec in sorted(shown, key=lambda r: r["id"]):
        target = targets[rec["target"]]
        grey = window(target.get("organ"))
        lesion = orient(masks[rec["id"]].full(volume.shape))
        ends = rec.get("diameter_endpoints_lps_mm")
        diameter = (
            {"z": ends[0][2], "ends": [e[:2] for e in ends], "mm": rec["longest_axial_diameter_mm"]} if ends else None
        )
        title = (
            f"Lesion {rec['id']} ({target['text']}): {rec['volume_ml']:.1f} mL, "
            f"{rec['longest_axial_diameter_mm']:.0f} mm"
        )
        out.append(
            Picture(
                f"lesion_{rec['id']:02d}.png",
                "lesions",
                title,
                pic.lesion_figure(vol, lesion, title, grey, lesion_colour(rec["id"] - 1), diameter),
            )
        )
        if healthy is not None:
            out.append(
                Picture(
                    f"synthesis_lesion_{rec['id']:02d}.png",
                    "synthesis",
                    f"Lesion {rec['id']}",
                    pic.synthesis_figure(
                        vol,
                        healthy,
                        lesion,
                        f"Lesion {rec['id']}: original vs pseudo-healthy",
                        grey,
                        "HU" if ctx["modality"] == "CT" else "intensity",
                    ),
                )
            )
    if attention is not None:
        for target in targets:
            found = attention.for_prompt(target["text"], target["index"])
            if found is None:
                continue
            _, prob = found
            ids = target["lesion_ids"]
            outline = orient(union(masks, ids, volume.shape)) if ids else None
            title = f"Attention: \u201c{target['text']}\u201d (anomaly score {_fmt(target.get('score'), 2)})"
            out.append(
                Picture(
                    f"attention_{target['index']:02d}.png",
                    "attention",
                    title,
                    pic.attention_figure(vol, orient(prob), outline, title, window(target.get("organ"))),
                )
            )
    return out


def union(masks: dict, ids: list[int], shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    for i in ids:
        masks[i].paint(out, True)
    return out


def _fmt(value, digits=1) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def _lesion_rows(ctx: dict) -> list[list[str]]:
    rows = []
    for rec in ctx["lesions"]:
        target = ctx["targets"][rec["target"]]
        intensity = (
            f"{rec['mean_intensity']:.0f} {rec.get('intensity_units', '')}".strip()
            if "mean_intensity" in rec
            else "n/a"
        )
        rows.append(
            [
                str(rec["id"]),
                target["text"],
                rec.get("site") or target.get("organ") or "-",
                _fmt(rec["volume_ml"], 2),
                _fmt(rec["longest_axial_diameter_mm"]),
                intensity,
                _fmt(rec.get("confidence"), 2),
                rec.get("source_slice") or "n/a",
                ", ".join(f"{v:.0f}" for v in rec["centroid_lps_mm"]),
            ]
        )
    return rows


LESION_HEADER = [
    "lesion",
    "prompt",
    "site",
    "volume (mL)",
    "longest axial diameter (mm)",
    "mean intensity",
    "confidence (not calibrated)",
    "slice in the source series",
    "centroid x, y, z (LPS mm)",
]
LESION_NOTES = [
    "Site: the organ the prompt names; left / right from the lesion's position against the body's midline "
    "(paired organs only, none named within 1 cm of the midline).",
    "Slice: the source series' instance through the lesion's longest axial diameter, to find it in PACS.",
    "Confidence: the lesion verifier's probability that the lesion's candidate is a lesion (the refinement "
    "head's mean probability inside the lesion where the verifier did not choose the candidates). It is not "
    "calibrated: it ranks the findings of this report, it is not the chance that a finding is real.",
]
TARGET_HEADER = ["#", "prompt", "organ", "anomaly score", "lesions", "total volume (mL)"]


def _target_rows(ctx: dict) -> list[list[str]]:
    return [
        [
            str(t["index"]),
            t["text"],
            t.get("organ") or "-",
            _fmt(t.get("score"), 3),
            str(len(t["lesion_ids"])),
            _fmt(t["total_volume_ml"], 2),
        ]
        for t in ctx["targets"]
    ]


def _facts(ctx: dict) -> list[tuple[str, str]]:
    s = ctx["study"]
    model = ctx["model"]
    return [
        ("Study key", ctx["study_key"]),
        ("Modality", f"{s['modality']} ({s['orientation']})"),
        ("Grid", f"{s['size']} voxels, {s['spacing']} mm"),
        ("Model", f"{model.get('name', 'unknown')} (sha256 {str(model.get('sha256', ''))[:12]}...)"),
        ("Software", f"diffugts {ctx['version']}"),
        ("Generated", ctx["generated"]),
    ]


SECTIONS = [
    ("lesions", "Lesion pictures"),
    ("attention", "Attention maps"),
    ("synthesis", "Original vs pseudo-healthy"),
]
SECTION_NOTES = {
    "lesions": "Axial slice of each lesion's longest diameter; left: whole slice, right: zoom with the outline "
    "and the diameter (dashed). Patient's right on the left of the picture.",
    "attention": "Anomaly probability of each prompt as a heat overlay (transparent below ~0.1), through its "
    "peak; cyan outlines: the lesions found for the prompt.",
    "synthesis": "The frozen diffusion model's pseudo-healthy reconstruction: what the tissue would look like "
    "without the lesion; the difference drives the refinement.",
}


def markdown(ctx: dict, pictures: list[Picture], image_dir: str | None = "images") -> str:
    """The report as Markdown; ``image_dir=None`` leaves the pictures out (the KFP UI's
    Markdown view shows no local files: its HTML view has them)."""
    lines = [f"# DiffuGTS report: {md(ctx['study_key'])}", "", f"> {DISCLAIMER}", ""]
    lines += [f"- **{k}**: {md(v)}" for k, v in _facts(ctx)]
    lines += ["", "## Prompts", "", *_md_table(TARGET_HEADER, _target_rows(ctx)), ""]
    lines += ["## Lesions", ""]
    if ctx["lesions"]:
        lines += [*_md_table(LESION_HEADER, _lesion_rows(ctx)), "", *[f"- {n}" for n in LESION_NOTES], ""]
    else:
        lines += ["No lesion above the minimum volume was found.", ""]
    lines += [f"- {md(n)}" for n in ctx.get("notes", [])]
    if image_dir is not None:
        for key, heading in SECTIONS:
            group = [p for p in pictures if p.section == key]
            if group:
                lines += ["", f"## {heading}", "", SECTION_NOTES[key], ""]
                lines += [f"![{md(p.title)}]({image_dir}/{p.name})" for p in group]
    return "\n".join(lines) + "\n"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#1d2530;
padding:0 16px}
h1{font-size:22px;margin-bottom:4px}
h2{font-size:18px;border-bottom:1px solid #d6dbe1;padding-bottom:4px;margin-top:28px}
.note{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;font-size:13px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px}dt{color:#5a6470}dd{margin:0}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d6dbe1;padding:4px 8px;text-align:left}
th{background:#f1f4f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:14px 0}figure img{max-width:100%;border:1px solid #e3e6ea}figcaption{font-size:13px;color:#5a6470}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:middle}
p.sect{font-size:13px;color:#5a6470}
"""


def html_report(ctx: dict, pictures: list[Picture]) -> str:
    """Self-contained HTML: inline CSS, pictures as data: URIs, no external references."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>DiffuGTS report {e(ctx['study_key'])}</title><style>{CSS}</style></head><body>",
        f"<h1>DiffuGTS report: {e(ctx['study_key'])}</h1>",
        f'<p class="note">{e(DISCLAIMER)}</p>',
        "<dl>",
    ]
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _facts(ctx)]
    parts += ["</dl>", "<h2>Prompts</h2>", _html_table(TARGET_HEADER, _target_rows(ctx), numeric={0, 3, 4, 5})]
    parts.append("<h2>Lesions</h2>")
    if ctx["lesions"]:
        rows = _lesion_rows(ctx)
        swatches = [
            f'<span class="swatch" style="background:rgb{lesion_colour(r["id"] - 1)}"></span>' for r in ctx["lesions"]
        ]
        parts.append(_html_table(LESION_HEADER, rows, numeric={3, 4, 5, 6}, first_cell_html=swatches))
        parts.append('<p class="sect">' + "<br>".join(e(n) for n in LESION_NOTES) + "</p>")
    else:
        parts.append("<p>No lesion above the minimum volume was found.</p>")
    if ctx.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in ctx["notes"]) + "</ul>")
    for key, heading in SECTIONS:
        group = [p for p in pictures if p.section == key]
        if not group:
            continue
        parts += [f"<h2>{e(heading)}</h2>", f'<p class="sect">{e(SECTION_NOTES[key])}</p>']
        for p in group:
            data = base64.b64encode(p.png).decode("ascii")
            parts.append(
                f'<figure><img alt="{e(p.title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(p.title)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_table(header, rows, numeric=frozenset(), first_cell_html=None) -> str:
    e = html.escape
    out = ["<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for n, row in enumerate(rows):
        cells = []
        for c, value in enumerate(row):
            prefix = first_cell_html[n] if (first_cell_html and c == 0) else ""
            cls = ' class="num"' if c in numeric else ""
            cells.append(f"<td{cls}>{prefix}{e(value)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</tbody></table>"
