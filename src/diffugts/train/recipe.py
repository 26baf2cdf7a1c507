"""The demo recipe: which phantom cases train what, with which settings.

Seeds are partitioned so that training never sees an evaluation case: backbone training
draws cohort seeds 1000-1999, the AOVA head 2000-2999, the refinement head 3000-3999;
evaluation uses 9000-9999 and the `make run` demo cohort seed 7.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

BACKBONE_SEED = 1000
AOVA_SEED = 2000
REFINE_SEED = 3000
AOVA_FEATURES = ["encoder1", "encoder2", "denoiser0", "denoiser1", "denoiser2"]


def default_features(backbone) -> list[str]:
    """The demo recipe's scales where the backbone has them (the demo and MAISI-like 3D
    models), else every scale but the finest (other families, e.g. 2D diffusers models)."""
    names = [s.name for s in backbone.feature_specs()]
    if set(AOVA_FEATURES) <= set(names):
        return list(AOVA_FEATURES)
    return names[1:]


@dataclass
class DemoRecipe:
    seed: int = 0
    # Sized to finish inside 60 minutes on 2 CPU cores (measured figures in the manifest).
    backbone_cases: int = 48  # half healthy, half seen lesions (CT)
    vae_steps: int = 900
    denoiser_steps: int = 3000
    aova_cases: int = 40
    aova_steps: int = 1500
    aova_dim: int = 32
    refine_cases: int = 30
    refine_steps: int = 900
    features: list[str] = field(default_factory=lambda: list(AOVA_FEATURES))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoRecipe":
        """A few minutes instead of most of an hour: for tests and smoke runs."""
        return cls(seed=seed, backbone_cases=6, vae_steps=30, denoiser_steps=30, aova_cases=6, aova_steps=40,
                   aova_dim=16, refine_cases=4, refine_steps=30)
