"""Lesion instances and their measurements, in millimetres of the patient frame.

``split_instances`` turns a binary mask into numbered lesions (26-connected components,
tiny ones dropped, numbered by decreasing volume); ``measure`` gives per lesion what a
radiologist reads off: volume, RECIST-style longest axial diameter, centroid in DICOM
patient coordinates (LPS), mean intensity and the model's confidence.
``lesion_artifact`` makes the lesion artifact (diffugts.artifacts.lesions) that the
refinement stage produces and the reporting stage reads.

"Axial" always means the patient's axial plane (perpendicular to the patient z axis), not
the slice plane of the series: the slices used for the diameter are the planes of the grid
axis closest to patient z, and in-plane positions are taken in patient x, y.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform

from diffugts.artifacts.geometry import Geometry
from diffugts.config import DEFAULT_MIN_VOLUME_ML

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)  # how a mask is cut into lesions, everywhere


def voxel_ml(geometry: Geometry) -> float:
    return float(np.prod(geometry.spacing)) / 1000.0


def split_instances(mask: np.ndarray, geometry: Geometry, min_volume_ml: float = DEFAULT_MIN_VOLUME_ML) -> np.ndarray:
    """uint16 lesion ids (0 = background): 26-connected components of ``mask`` of at least
    ``min_volume_ml``, id 1 the largest (ties: first in array order)."""
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.shape != geometry.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the geometry {geometry.shape}")
    components, n = ndimage.label(mask, structure=CONNECTIVITY_26)
    if n == 0:
        return np.zeros(mask.shape, np.uint16)
    counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(counts * voxel_ml(geometry) >= min_volume_ml)
    order = keep[np.argsort(-counts[keep], kind="stable")]
    if len(order) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(order)} lesions: more than a uint16 label map holds")
    relabel = np.zeros(n + 1, np.uint16)
    relabel[order + 1] = np.arange(1, len(order) + 1, dtype=np.uint16)
    return relabel[components]


def axial_axis(geometry: Geometry) -> int:
    """Array axis (0 = k, 1 = j, 2 = i) whose planes are the axial slices: the grid axis
    closest to the patient z axis."""
    ijk = int(np.argmax(np.abs(geometry.direction[2, :])))
    return 2 - ijk


def measure(
    labels: np.ndarray,
    geometry: Geometry,
    volume: np.ndarray | None = None,
    probability: np.ndarray | None = None,
    intensity_units: str = "HU",
) -> list[dict]:
    """One record per lesion id present in ``labels``, in id order (see module docstring)."""
    labels = np.asarray(labels)
    if labels.shape != geometry.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the geometry {geometry.shape}")
    out = []
    for lesion_id, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        inside = labels[box] == lesion_id
        start = np.array([s.start for s in box])
        kji = np.argwhere(inside) + start
        centroid = geometry.world(kji.mean(axis=0)[::-1])
        diameter, slice_index, ends = longest_axial_diameter(inside, start, geometry)
        axis = axial_axis(geometry)
        areas = inside.sum(axis=tuple(a for a in range(3) if a != axis))
        rec = {
            "id": lesion_id,
            "voxels": int(len(kji)),
            "volume_ml": round(len(kji) * voxel_ml(geometry), 4),
            "longest_axial_diameter_mm": round(diameter, 2),
            # where to look: the axial slice of the diameter, and of the largest cross-section
            "axial_axis": "kji"[axis],
            "diameter_slice": slice_index,
            "diameter_endpoints_lps_mm": [[round(float(v), 2) for v in p] for p in ends],
            "largest_slice": int(np.argmax(areas) + start[axis]),
            "centroid_lps_mm": [round(float(v), 2) for v in centroid],
            # half-open [start, stop) per array axis, like Python slices
            "bbox_kji": [[int(s.start), int(s.stop)] for s in box],
        }
        if volume is not None:
            values = np.asarray(volume)[box][inside]
            rec["mean_intensity"] = round(float(values.mean()), 2)
            rec["std_intensity"] = round(float(values.std()), 2)
            rec["intensity_units"] = intensity_units
        if probability is not None:
            rec["confidence"] = round(float(np.asarray(probability)[box][inside].mean()), 4)
        out.append(rec)
    return out


def longest_axial_diameter(inside: np.ndarray, start: np.ndarray, geometry: Geometry) -> tuple[float, int, list]:
    """(mm, slice index, two end points in LPS) of the longest in-plane extent over the
    axial slices of one lesion (``inside``: its mask in a box starting at ``start``, kji).

    The distance between the two farthest voxel centres of a slice, plus one voxel's width
    along that line (the voxel taken as the ellipse inscribed in it, so diagonals are not
    favoured): a digitised disc of radius r measures 2r within a voxel, and a one-voxel
    lesion measures one voxel, not zero.
    """
    axis = axial_axis(geometry)
    # In-plane edge vectors of a voxel in patient x, y (array axis a is index axis 2 - a).
    edges = [geometry.matrix[:2, 2 - a] for a in range(3) if a != axis]
    best: tuple[float, int, list] = (-1.0, 0, [])
    for s in range(inside.shape[axis]):
        plane = np.take(inside, s, axis=axis)
        if not plane.any():
            continue
        boundary = plane & ~ndimage.binary_erosion(plane)
        kji = np.insert(np.argwhere(boundary), axis, s, axis=1) + start
        world = geometry.world(kji[:, ::-1])
        world = world[_hull_indices(world[:, :2])]
        a, b, dist = _farthest_pair(world[:, :2])
        direction = (world[b, :2] - world[a, :2]) / dist if dist > 0 else np.array([1.0, 0.0])
        width = float(np.hypot(*(direction @ e for e in edges)))
        if dist + width > best[0]:
            best = (dist + width, int(s + start[axis]), [world[a], world[b]])
    return best


def _farthest_pair(xy: np.ndarray) -> tuple[int, int, float]:
    if len(xy) == 1:
        return 0, 0, 0.0
    d = squareform(pdist(xy))
    a, b = np.unravel_index(np.argmax(d), d.shape)
    return int(a), int(b), float(d[a, b])


def _hull_indices(xy: np.ndarray) -> np.ndarray:
    """Indices of the convex hull's vertices (the farthest pair is among them); of all
    points when the set is small or degenerate (a line)."""
    if len(xy) < 16:
        return np.arange(len(xy))
    try:
        return ConvexHull(xy).vertices
    except QhullError:
        return np.arange(len(xy))


def lesion_artifact(
    study,
    targets: Sequence[dict],
    labels_per_target: Sequence[np.ndarray],
    probability_per_target: Sequence[np.ndarray | None] | None = None,
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
    model: dict | None = None,
    stage: str = "refine",
    verifier_threshold: float | None = None,
):
    """The lesion artifact for ``study`` (a :class:`diffugts.artifacts.study.Study`) in memory
    (:class:`diffugts.artifacts.lesions.Lesions`).

    ``targets[n]`` is ``{"prompt": {"text", "organ", ...}, "score": float}`` (any extra keys
    are kept); ``labels_per_target[n]`` its mask on the study grid (non-zero = lesion).
    Lesions are split per target and numbered globally (target 0's first); in the instance
    map, where targets overlap, the earlier target's id wins. ``verifier_threshold``: the lesion
    verifier's operating point the run chose instead of the model's (recorded when given).
    """
    from diffugts.artifacts.lesions import INSTANCES, Lesions, mask_name

    if len(targets) != len(labels_per_target):
        raise ValueError("one mask per target expected")
    probs = probability_per_target or [None] * len(targets)
    geometry = study.geometry
    units = "HU" if study.modality == "CT" else "a.u."  # ingestion rescales CT to HU; MR has no unit
    instances = np.zeros(geometry.shape, np.uint16)
    entries, lesions, masks, next_id = [], [], [], 1
    for n, (target, mask, prob) in enumerate(zip(targets, labels_per_target, probs)):
        mask = np.asarray(mask) != 0
        masks.append(mask)
        local = split_instances(mask, geometry, min_volume_ml)
        records = measure(local, geometry, study.volume, prob, units)
        ids = []
        for rec in records:
            new_id = next_id
            next_id += 1
            free = (local == rec["id"]) & (instances == 0)
            instances[free] = new_id
            ids.append(new_id)
            lesions.append({**rec, "id": new_id, "target": n})
        entries.append({**target, "index": n, "mask": mask_name(n, target["prompt"]["text"]), "lesion_ids": ids})
    summary = {
        "stage": stage,
        "model": dict(model or {}),
        "targets": entries,
        "lesions": lesions,
        "min_volume_ml": min_volume_ml,
        **({"verifier_threshold": verifier_threshold} if verifier_threshold is not None else {}),
        "instances": INSTANCES,
    }
    return Lesions(summary, instances, masks)


def write_lesion_artifact(out_dir: str | os.PathLike, study, *args, **kwargs) -> dict:
    """:func:`lesion_artifact` (same arguments after ``out_dir``) written to ``out_dir``
    (``lesions.json`` last); returns its content."""
    from diffugts.artifacts import lesions as artifact

    return artifact.write(out_dir, lesion_artifact(study, *args, **kwargs), study.geometry)
