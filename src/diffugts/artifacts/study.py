"""The study artifact (ingestion's output): the volume on its exact DICOM grid, header copies,
rejections, and ``series.json`` last (written by diffugts.stages.ingest.writer)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from diffugts.artifacts.files import read_marker
from diffugts.artifacts.geometry import Geometry
from diffugts.errors import InputError, ParameterError

MARKER = "series.json"
VOLUME = "volume.nii"  # uncompressed: gzip would cost more than the DICOM read on large CTs
REJECTIONS = "rejections.json"


@dataclass
class Study:
    root: Path
    series: dict
    volume: np.ndarray  # float32 (k, j, i), CT in HU
    geometry: Geometry  # exact, from series.json

    @property
    def modality(self) -> str:
        return self.series["modality"]

    @classmethod
    def from_image(cls, image: sitk.Image, modality: str = "CT") -> Study:
        """A study held in memory from a SimpleITK image (CT in HU, or MR): what
        :class:`diffugts.core.Core` takes without an ingested folder. No DICOM headers, so it
        can be segmented but not reported as DICOM SEG / SR."""
        if modality not in ("CT", "MR"):
            raise ParameterError("{modality} must be CT or MR, not " + repr(modality), "modality")
        volume = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        return cls(Path(), {"modality": modality}, volume, Geometry.from_sitk(image))


def load_study(path: str | os.PathLike) -> Study:
    root = Path(path)
    series = read_marker(root, MARKER, "a study", "run `diffugts ingest` first")
    try:
        geometry = Geometry.from_dict(series["volume"])
        image = sitk.ReadImage(str(root / series["volume"]["file"]))
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise InputError(root, f"unreadable study artifact ({' '.join(str(err).split())[:120]})") from None
    volume = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if tuple(volume.shape) != geometry.shape:
        raise InputError(root, f"volume shape {volume.shape} does not match series.json {geometry.shape}")
    return Study(root, series, volume, geometry)
