"""The overview picture for the docs: CT and MR cases, every lesion type, lesions outlined.

Axial slices in radiological display (patient's right on the image left, anterior at the top),
CT at the abdominal window (W400/L40), MR between its 1st and 99.5th percentiles.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from diffugts.phantom.case import Case, CaseSpec, generate_case
from diffugts.phantom.labels import O

# (title tag, modality, MR contrast, lesion type, organs, healthy); None type = healthy twin
PANELS = (
    ("CT", "CT", None, "hypodense", ("liver",), False),
    ("CT", "CT", None, "hyperenhancing", ("liver",), False),
    ("CT", "CT", None, "cystic", ("right kidney", "left kidney"), False),
    ("CT", "CT", None, "rim_necrotic", ("liver",), False),
    ("CT", "CT", None, "infiltrative", ("pancreas",), False),
    ("CT", "CT", None, "multifocal", ("liver",), False),
    ("CT", "CT", None, "hyperenhancing", ("right kidney", "left kidney"), False),
    ("CT", "CT", None, "hypodense", ("spleen",), False),
    ("MR T1", "MR", "T1", "rim_necrotic", ("liver",), False),
    ("MR T2", "MR", "T2", "rim_necrotic", ("liver",), False),
    ("MR T2", "MR", "T2", "cystic", ("liver",), False),
    ("CT healthy", "CT", None, None, ("liver",), True),
)
CORONAL = (0, 3, 10, 11)  # panels also shown as a coronal reformat


def montage_cases(seed: int = 0) -> list[tuple[str, Case]]:
    out: list[tuple[str, Case]] = []
    base = 1000  # case indices of their own, away from a cohort's first indices
    for i, (tag, mod, mr, t, organs, healthy) in enumerate(PANELS):
        spec = CaseSpec(
            seed=seed,
            index=base + i,
            modality=mod,
            mr_contrast=mr,
            lesion_types=(t,) if t else None,
            organs=organs,
            healthy=healthy,
            healthy_fraction=0.0,
        )
        if mr == "T2" and PANELS[i - 1][2] == "T1":  # same patient as the T1 panel before
            out.append((tag, generate_case(replace(spec, index=out[-1][1].spec.index))))
            continue
        for k in range(20):  # a lesion may not fit or be tiny; try the next patient
            case = generate_case(replace(spec, index=spec.index + 100 * k))
            big = max((r["diameter_mm"] for r in case.lesions), default=0.0)
            if healthy or big >= (8 if t == "multifocal" else 20):
                break
        out.append((tag, case))
    return out


def write_montage(path: Path, seed: int = 0, cols: int = 4) -> Path:
    """Axial panels (PANELS) plus a row of coronal reformats of four of the same cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffugts.utils.atomic import atomic_path

    cases = montage_cases(seed)
    coronal = [cases[i] for i in CORONAL]
    rows = -(-len(cases) // cols) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.4 * rows), facecolor="black")
    for ax, (tag, case) in zip(axes.ravel(), cases):
        k = _slice(case)
        _panel(
            ax,
            case,
            case.image[k],
            case.lesion_map[k],
            1.0,
            f"{tag}: {_what(case)}",
            f"seed {case.spec.seed} case {case.spec.index}  axial z={k}",
        )
    for ax, (tag, case) in zip(axes[-1], coronal):
        j = _row(case)
        aspect = case.grid.spacing[2] / case.grid.spacing[0]
        _panel(
            ax,
            case,
            case.image[::-1, j, :],
            case.lesion_map[::-1, j, :],
            aspect,
            f"{tag} coronal: {_what(case)}",
            f"seed {case.spec.seed} case {case.spec.index}  coronal y={j}",
        )
    fig.suptitle(
        "diffugts phantom world: lesions outlined in yellow; radiological view "
        "(R = patient right, anterior up; coronal: head up)",
        color="white",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, facecolor="black")
    plt.close(fig)
    return path


def _what(case: Case) -> str:
    if not case.lesions:
        return "no lesion"
    les = max(case.lesions, key=lambda r: r["voxels"])
    return f"{les['organ']} - {les['type'].replace('_', ' ')} ({les['split']})"


def _panel(ax, case, img, lesions, aspect, title, note):
    if case.spec.modality == "CT":
        lo, hi = -160, 240
    else:
        lo, hi = np.percentile(case.image[case.image > 0], [1, 99.5])
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear", aspect=aspect)
    if lesions.any():
        ax.contour(lesions > 0, [0.5], colors=["#ffd400"], linewidths=0.9)
    ax.set_title(title, color="white", fontsize=9.5)
    h, w = img.shape
    ax.text(
        0.02 * w,
        0.98 * h,
        note,
        color="#c8c8c8",
        fontsize=7,
        bbox=dict(facecolor="black", alpha=0.6, pad=1, linewidth=0),
    )
    ax.text(0.02 * w, 0.06 * h, "R", color="white", fontsize=9)
    ax.text(0.94 * w, 0.06 * h, "L", color="white", fontsize=9)
    ax.axis("off")


def _row(case: Case) -> int:
    """Coronal plane: through the largest lesion, else through the kidneys."""
    if case.lesions:
        les = max(case.lesions, key=lambda r: r["voxels"])
        return int(np.argwhere(case.lesion_map == les["id"])[:, 1].mean())
    return int(np.argwhere(case.organs == O.left_kidney)[:, 1].mean())


def _slice(case: Case) -> int:
    if not case.lesions:  # the lung bases over the liver dome: lungs, heart and liver together
        lung = np.isin(case.organs, (O.right_lung, O.left_lung)).sum(axis=(1, 2))
        liver = (case.organs == O.liver).sum(axis=(1, 2))
        return int(np.argmax(np.minimum(lung, liver)))
    les = max(case.lesions, key=lambda r: r["voxels"])
    area = (case.lesion_map == les["id"]).sum(axis=(1, 2))
    return int(np.argmax(area))
