"""The method's parameters and every default, defined once.

No torch here: the CLI, the Kubeflow components and cohort hashing read these without loading
a network. Library code takes the dataclasses; the CLI turns flags into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from diffugts.errors import ParameterError


class MapMode(StrEnum):
    """Where a prompt's coarse map comes from (attention.json ``maps``)."""

    AOVA = "aova"  # the package's trained AOVA head
    TRAINING_FREE = "training-free"  # the backbone's own text cross-attention (2D diffusers family)

    @classmethod
    def parse(cls, value: str | MapMode) -> MapMode:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ParameterError(f"unknown {{maps}} {str(value)!r} (one of: {choices})", "maps") from None


# A model package's networks (manifest ``networks.<name>``, weights ``<name>.safetensors``).
AOVA_HEAD = "aova"
REFINE_HEAD = "refine"
ORGAN_NET = "organs"  # organ grounding (networks.organs); optional in a package

DEFAULT_COARSE_THRESHOLD = 0.5  # the coarse mask's threshold where the package sets none
DEFAULT_REFINE_THRESHOLD = 0.5  # the refined mask's, for heads trained before calibration
DEFAULT_MIN_VOLUME_ML = 0.1  # lesions smaller than this are dropped
DEFAULT_SEED = 0  # the attention features' noise draw (same seed, same maps)


@dataclass(frozen=True)
class AttentionParams:
    """Stage 2. ``threshold`` None: the package's (``networks.aova.threshold``)."""

    maps: MapMode = MapMode.AOVA
    threshold: float | None = None
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        object.__setattr__(self, "maps", MapMode.parse(self.maps))


@dataclass(frozen=True)
class SynthesisParams:
    """Stage 3's knobs (all recorded in synthesis.json; docs/synthesis.md says why these defaults)."""

    dilation_mm: float = 8.0  # grow the coarse mask so the lesion's border is regenerated too
    strength: float = 0.8  # noise level to start from, fraction of the schedule (1 = pure noise)
    steps: int = 10  # denoising steps from strength * T to 0 (20 gave the same fidelity: docs/synthesis.md)
    jumps: int = 0  # RePaint resampling: re-noise one step back and redo, this many times per step
    seed: int = 0  # the noise draw (CPU generator: same draw on every device)
    context_mm: float = 48.0  # tissue around the mask the denoiser sees
    feather_mm: float = 4.0  # width of the paste-back ramp inside the dilated mask's border
    tile: int | tuple[int, int, int] | None = None  # model voxels per tile side; None: the package's
    tile_overlap: float = 0.5  # fraction of a tile shared with its neighbour (0.25 leaves seams)
    harmonise: bool = True  # shift H by the median x - H of the regenerated ring around the mask

    def validate(self) -> None:
        checks = [
            ("dilation_mm", self.dilation_mm >= 0, "must be >= 0"),
            ("strength", 0 < self.strength <= 1, "must be in (0, 1]"),
            ("steps", self.steps >= 1, "must be >= 1"),
            ("jumps", self.jumps >= 0, "must be >= 0"),
            ("context_mm", self.context_mm >= 0, "must be >= 0"),
            ("feather_mm", self.feather_mm >= 0, "must be >= 0"),
            ("tile_overlap", 0 <= self.tile_overlap < 1, "must be in [0, 1)"),
            ("tile", self.tile is None or min(np.atleast_1d(self.tile)) > 0, "must be positive"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ParameterError(f"synthesis: {{{name}}} {message}", name)


NO_VERIFIER = (
    "{model}: the model has no lesion verifier, so a verifier threshold has nothing to set; "
    "leave it out (pipelines: below 0)"
)
PIPELINE_MODEL_THRESHOLD = -1.0  # a pipeline's "the model's own" operating point: KFP parameters cannot be None


def pipeline_threshold(value: float) -> float | None:
    """A pipeline parameter's lesion verifier operating point: below 0 (the default,
    ``PIPELINE_MODEL_THRESHOLD``) the model's own (None), else the value (0..1)."""
    return None if float(value) < 0.0 else float(value)


@dataclass(frozen=True)
class RefineParams:
    """Stage 4. ``verifier_threshold``: the lesion verifier's operating point, the least
    probability of being a lesion a candidate needs to be reported (None: the package's; lower
    finds more lesions and reports more false ones)."""

    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML
    verifier_threshold: float | None = None

    def __post_init__(self) -> None:
        t = self.verifier_threshold
        if t is not None and not (isinstance(t, (int, float)) and 0.0 <= t <= 1.0):
            raise ParameterError(f"refine: {{verifier_threshold}} must lie in [0, 1], not {t!r}", "verifier_threshold")


@dataclass(frozen=True)
class MethodParams:
    """Everything a run of the method is configured by, beyond the model and the prompts."""

    attention: AttentionParams = AttentionParams()
    synthesis: SynthesisParams = SynthesisParams()
    refine: RefineParams = RefineParams()
