"""A human summary of the selection decisions (Markdown), for the Kubeflow UI and docs."""

from __future__ import annotations

from diffugts.utils.markdown import md


def selection_markdown(series: dict) -> str:
    v = series["volume"]
    size = " x ".join(str(n) for n in v["size_ijk"])
    spacing = " x ".join(f"{s:.2f}" for s in v["spacing_mm"])
    lines = [
        "# Ingestion",
        "",
        f"**Taken:** {md(series['series_label'])}: {size} voxels, {spacing} mm, "
        f"{md(series['orientation'])}, units {md(v['units'])}.",
        "",
    ]
    if series.get("notes"):
        lines += [f"- {md(note)}" for note in series["notes"]] + [""]
    lines += ["| series | taken | why |", "|---|---|---|"]
    for c in series["selection"]["candidates"]:
        why = f"matched *{md(c['selection'])}*" if c["taken"] else md("; ".join(c["reasons"]))
        lines.append(f"| {md(c['label'])} | {'yes' if c['taken'] else 'no'} | {why} |")
    skipped = series.get("rejected_files", 0)
    if skipped:
        lines += ["", f"{skipped} file(s) skipped; see `rejections.json` in the study artifact."]
    return "\n".join(lines) + "\n"
