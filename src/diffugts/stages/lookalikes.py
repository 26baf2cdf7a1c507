"""Look-alikes: where in an organ healthy anatomy looks like a lesion to the normative model.

The normative model's false candidates on lesion-free studies recur at the same places of an
organ: the vena cava's notch at the back of the liver, the veins along the pancreas, the
kidney's sinus (docs/benchmarks.md, "Look-alikes"). A lesion may lie anywhere. So the lesion
verifier may weigh how many false candidates lesion-free studies raised near a candidate's
place in its organ (``lookalikes``, diffugts.stages.verification): a look-alike atlas, per
organ and modality, of the places of every normative candidate of lesion-free phantoms the
verifier never fitted on (``diffugts train verifier --lookalike-cases N``). Nothing of a lesion
type's look enters it: only where healthy tissue of this organ is unusual.

A place is a candidate's centroid in its organ map's bounding box, 0 at the box's first voxel
and 1 at its last along each array axis of the model grid (whose orientation is fixed), so
organs of different sizes share one frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# How near (in organ-box units, per axis 0..1) another study's look-alike must lie to count.
# Development seeds: 0.05 / 0.08 / 0.12 separated true from false candidates with AUC 0.58 /
# 0.64 / 0.66, and 0.08 gained the most lesions beside the recipe's features.
RADIUS = 0.08
# Added to the look-alikes per study before the log, so that an empty neighbourhood is finite.
FLOOR = 0.02


def places(labels: np.ndarray, ids: list[int], organ: np.ndarray) -> np.ndarray:
    """(N, 3): each component's centroid in ``organ``'s bounding box (0..1 per axis); with an
    empty organ map, in the whole grid's box."""
    organ = np.asarray(organ, bool)
    if not ids:
        return np.zeros((0, 3))
    centres = np.asarray(ndimage.center_of_mass(np.ones(labels.shape, np.float32), labels, ids), float).reshape(-1, 3)
    if organ.any():
        where = np.nonzero(organ)
        first = np.array([w.min() for w in where], float)
        last = np.array([w.max() for w in where], float)
    else:
        first, last = np.zeros(3), np.asarray(labels.shape, float) - 1
    return (centres - first) / np.maximum(last - first, 1.0)


@dataclass(frozen=True)
class Lookalikes:
    """One organ and modality's look-alike places (M, 3) over ``studies`` lesion-free studies."""

    places: np.ndarray
    studies: int

    def feature(self, where: np.ndarray) -> np.ndarray:
        """(N, 3) places -> (N,) log(look-alikes within RADIUS per study + FLOOR)."""
        where = np.asarray(where, float).reshape(-1, 3)
        near = np.zeros(len(where))
        if len(self.places) and self.studies > 0:
            distance = np.linalg.norm(where[:, None, :] - np.asarray(self.places, float)[None, :, :], axis=2)
            near = (distance < RADIUS).sum(1) / self.studies
        return np.log(near + FLOOR)


NONE = Lookalikes(np.zeros((0, 3)), 0)  # an organ and modality the atlas has no studies of


def atlas_entry(found: dict[str, list[np.ndarray]], studies: dict[str, int]) -> dict:
    """The verifier's ``lookalikes`` entry (JSON): per key (organ/modality) its studies and
    places, rounded to 1e-4 of the box."""
    return {
        k: {
            "studies": int(studies[k]),
            "places": np.round(np.concatenate(found.get(k) or [np.zeros((0, 3))]), 4).tolist(),
        }
        for k in sorted(studies)
    }


def lookalikes_for(entry: dict | None, key: str | None) -> Lookalikes:
    """The atlas entry's look-alikes of ``key`` (NONE where it has none)."""
    if not entry or key not in entry:
        return NONE
    return Lookalikes(np.asarray(entry[key]["places"], float).reshape(-1, 3), int(entry[key]["studies"]))
