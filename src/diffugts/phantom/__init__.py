"""The demo world: procedural CT/MR abdomen phantoms with named organs, a lesion library and
exact ground truth, written as DICOM series (see docs/phantoms.md).

Modules: ``grid`` (voxel grid, LPS geometry, smooth random fields), ``shapes`` (implicit
primitives), ``labels`` (organ and tissue names), ``anatomy`` (assembly) with ``body`` (wall,
chest, skeleton) and ``viscera`` (abdominal organs), ``lesions`` (lesion types, placement,
painting), ``render`` (CT / MR intensities, PSF, noise), ``split`` (seen / unseen), ``case``
(one case in memory), ``dicom`` (series writer), ``cohort`` (case folders, cohorts),
``montage`` (the overview picture), ``truth`` (a case folder's ground truth for the synthesis
fidelity figures; not imported here, it loads the synthesis stage).
"""

from diffugts.phantom.case import GENERATOR_VERSION, Case, CaseSpec, generate_case
from diffugts.phantom.cohort import generate_cohort, write_case
from diffugts.phantom.labels import ORGANS
from diffugts.phantom.lesions import LESION_TYPES, prompts
from diffugts.phantom.split import SEEN, split_of, unseen_reasons

__all__ = [
    "GENERATOR_VERSION",
    "LESION_TYPES",
    "ORGANS",
    "SEEN",
    "Case",
    "CaseSpec",
    "generate_case",
    "generate_cohort",
    "prompts",
    "split_of",
    "unseen_reasons",
    "write_case",
]
