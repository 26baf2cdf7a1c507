"""Stage 3, pseudo-healthy synthesis by latent inpainting (docs/synthesis.md). The stage's
entry points are in :mod:`.stage`; its parts: ``masks`` (the region and its paste-back
weights), ``inpaint`` (the blended latent diffusion loop), ``fidelity`` (figures against a
known healthy twin)."""

from diffugts.stages.synthesize.fidelity import GroundTruth, fidelity, mask_truth
from diffugts.stages.synthesize.inpaint import Tiles, inpaint, renoise
from diffugts.stages.synthesize.masks import Region, make_region
from diffugts.stages.synthesize.stage import pseudo_healthy, synthesis, synthesize

__all__ = [
    "GroundTruth",
    "Region",
    "Tiles",
    "fidelity",
    "inpaint",
    "make_region",
    "mask_truth",
    "pseudo_healthy",
    "renoise",
    "synthesis",
    "synthesize",
]
