"""Evaluation on datasets: figures per dataset and per lesion type, and the paper's figures
beside ours for the datasets it reports (``paper-figures.json``)."""

from __future__ import annotations

from diffugts.datasets.protocol import paper_figures


def summarise_datasets(rows: list[dict], healthy_rows: list[dict]) -> dict:
    from diffugts.runners.evaluate import summarise, summarise_healthy

    return {
        "by_dataset": summarise(
            rows, {"dataset_split": ["dataset", "split"], "dataset_type": ["dataset", "lesion_type"]}
        ),
        "healthy_by_dataset": summarise_healthy([r for r in healthy_rows if "dataset" in r], key="dataset"),
    }


def markdown_datasets(result: dict, variants: list[str]) -> list[str]:
    paper = paper_figures()
    by = result.get("by_dataset", {})
    lines = [
        "### Seen / unseen Dice per dataset (the full method), beside the paper",
        "",
        "| dataset | split | n | Dice % (ours, full) | NSD % | detection | Dice % (paper, DiffuGTS) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, cells in by.get("dataset_split", {}).items():
        dataset, split = key.split(" / ")
        cell = cells.get("full") or next(iter(cells.values()))
        figure = f"{paper[dataset]:.2f}" if dataset in paper else "-"
        lines.append(
            f"| {dataset} | {split} | {cell['n']} | {100 * cell['dice']:.2f} | {100 * cell['nsd']:.2f} | "
            f"{cell['detection']:.2f} | {figure} |"
        )
    lines.append("")
    for name, title in (("dataset_split", "dataset and split"), ("dataset_type", "dataset and lesion type")):
        lines += [
            f"### By {title}",
            "",
            "| group | n | " + " | ".join(variants) + " |",
            "|---|---|" + "---|" * len(variants),
        ]
        for key, cells in by.get(name, {}).items():
            n = next(iter(cells.values()))["n"]
            vals = [
                f"{cells[v]['dice']:.3f} / {cells[v]['nsd']:.3f} / {cells[v]['detection']:.2f} / "
                f"{cells[v]['false_lesions']:.2f}"
                if v in cells
                else "-"
                for v in variants
            ]
            lines.append(f"| {key} | {n} | " + " | ".join(vals) + " |")
        lines.append("")
    healthy = result.get("healthy_by_dataset") or {}
    if healthy:
        lines += [
            "### Lesion-free studies per dataset: false lesions per study",
            "",
            "| dataset | studies | " + " | ".join(variants) + " |",
            "|---|---|" + "---|" * len(variants),
        ]
        for dataset, cells in healthy.items():
            n = next(iter(cells.values()))["studies"]
            vals = [f"{cells[v]['false_lesions_per_study']:.2f}" if v in cells else "-" for v in variants]
            lines.append(f"| {dataset} | {n} | " + " | ".join(vals) + " |")
        lines.append("")
    names = ", ".join(
        f"{d['name']} ({d.get('role', 'evaluate')}, {len(d['cases'])} cases, mapping sha256 "
        f"{d['mapping']['sha256'][:12]})"
        for d in result["datasets"]
    )
    lines += [f"Datasets: {names}. Paper figures: DiffuGTS, CVPR 2025 (arXiv 2505.02753), Dice %.", ""]
    return lines
