"""Organ masks from TotalSegmentator, for datasets that label only the tumour (MSD lung,
colon, hepatic vessel) or want more organs than they label.

A source folder holds, per case, TotalSegmentator's output for that case's image, either

- ``<ORGANS>/<case_id>/`` with its per-organ files (``liver.nii.gz``, ``kidney_left.nii.gz``,
  ... as ``TotalSegmentator -i img -o <ORGANS>/<case_id>`` writes them), or
- ``<ORGANS>/<case_id>.nii.gz``: the multilabel file of ``TotalSegmentator --ml`` (the v2
  ``total`` task's class numbers, below).

Only the organs prompts use are read; the TotalSegmentator names map to prompt organs as in
:data:`TS_ORGANS` (kidney cysts are kidney: the host region of a kidney lesion).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from diffugts.errors import InputError

# TotalSegmentator file / class name -> prompt organ (diffugts.phantom.labels names, + lung, colon).
TS_ORGANS = {
    "liver": "liver",
    "spleen": "spleen",
    "pancreas": "pancreas",
    "kidney_left": "left kidney",
    "kidney_right": "right kidney",
    "kidney_cyst_left": "left kidney",
    "kidney_cyst_right": "right kidney",
    "stomach": "stomach",
    "gallbladder": "gallbladder",
    "aorta": "aorta",
    "colon": "colon",
    "lung_upper_lobe_left": "lung",
    "lung_lower_lobe_left": "lung",
    "lung_upper_lobe_right": "lung",
    "lung_middle_lobe_right": "lung",
    "lung_lower_lobe_right": "lung",
    "lung_left": "lung",
    "lung_right": "lung",  # total_mr's per-organ files
}
# TotalSegmentator v2 ``total`` task: class number -> name, for the organs above.
TS_V2_CLASSES = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right",
    20: "colon",
    23: "kidney_cyst_left",
    24: "kidney_cyst_right",
    52: "aorta",
}


class OrganSource:
    """TotalSegmentator outputs under ``root``, one per case id."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(self.root, "organ source: not a folder (TotalSegmentator outputs, one per case)")

    def has(self, case_id: str) -> bool:
        return (self.root / case_id).is_dir() or (self.root / f"{case_id}.nii.gz").is_file()

    def organs(self, case_id: str, reference: sitk.Image) -> dict[str, np.ndarray]:
        """Prompt organ -> bool mask (k, j, i) on ``reference``'s grid (TotalSegmentator keeps
        the input grid; others are resampled, nearest neighbour)."""
        folder, multi = self.root / case_id, self.root / f"{case_id}.nii.gz"
        out: dict[str, np.ndarray] = {}
        if folder.is_dir():
            for name, organ in TS_ORGANS.items():
                path = folder / f"{name}.nii.gz"
                if path.is_file():
                    mask = _on_grid(_read(path), reference, path) > 0
                    out[organ] = out.get(organ, np.zeros(mask.shape, bool)) | mask
            if not out:
                raise InputError(
                    folder, f"no TotalSegmentator organ file of a prompt organ ({', '.join(sorted(set(TS_ORGANS)))})"
                )
        elif multi.is_file():
            labels = _on_grid(_read(multi), reference, multi)
            for value, name in TS_V2_CLASSES.items():
                mask = labels == value
                if mask.any():
                    organ = TS_ORGANS[name]
                    out[organ] = out.get(organ, np.zeros(mask.shape, bool)) | mask
        else:
            raise InputError(
                folder,
                f"no TotalSegmentator output for case {case_id} (a folder {case_id}/ or a file {case_id}.nii.gz)",
            )
        return out


def _read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(path, f"cannot read ({' '.join(str(err).split())[:160]})") from None


def _on_grid(image: sitk.Image, reference: sitk.Image, path: Path) -> np.ndarray:
    if image.GetDimension() != 3:
        raise InputError(path, f"expected a 3D label image, got {image.GetDimension()}D")
    if not same_grid(image, reference):
        image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(image)


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol, 1e-2))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )
