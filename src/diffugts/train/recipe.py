"""The demo recipe: which phantom cases train what, with which settings.

Seeds are partitioned so that training never sees an evaluation case: backbone training
draws cohort seeds 1000-1999, the AOVA head 2000-2999, the refinement head 3000-3999;
evaluation uses 9000-9999 and the `make run` demo cohort seed 7.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from diffugts.errors import ConfigError

BACKBONE_SEED = 1000
AOVA_SEED = 2000
REFINE_SEED = 3000
SYNTHETIC_INDEX = 1000  # healthy cases for synthetic anomalies: indices from here in the AOVA seed range
SYNTHETIC_STREAM = 77  # the anomalies' own random stream, apart from the phantoms'
RANDOMISE_STREAM = 78  # the intensity randomisation's own stream
HEALTHY_INDEX = 3000  # lesion-free cases for the refinement head: indices from here in its seed range
VERIFY_INDEX = 4000  # seen-type cases for the lesion verifier: indices from here in the refinement seed range
VERIFY_HEALTHY_INDEX = 4500  # and its lesion-free cases
MR_INDEX = 2000  # lesion-free MR cases for region grounding: indices from here in the AOVA seed range
NORMATIVE_INDEX = 5000  # lesion-free cases for the normative model: indices from here in the AOVA seed range
NORMATIVE_MR_OFFSET = 500  # its MR cases: from NORMATIVE_INDEX + this (other anatomy than its CT cases)
NORMATIVE_CALIBRATION_OFFSET = 250  # its held-out calibration cases: from NORMATIVE_INDEX (+ MR offset) + this
NORMATIVE_MEMBER_OFFSET = 1000  # a committee's member m fits on cases from NORMATIVE_INDEX + m * this (+ MR offset)
VERIFY_MR_OFFSET = 250  # the verifier's lesion-free MR cases: from VERIFY_HEALTHY_INDEX + this (other anatomy)
VERIFY_ANOMALY_INDEX = 4800  # the verifier's lesion-free cases with generic anomalies (MR: + VERIFY_MR_OFFSET)
VERIFY_ANOMALY_STREAM = 79  # their anomalies' own random stream
VERIFY_LOOKALIKE_INDEX = 5200  # the verifier's look-alike atlas: lesion-free cases (MR: + VERIFY_MR_OFFSET)
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
    aova_steps: int = 1200
    aova_dim: int = 32
    # Healthy cases with generic synthetic anomalies (train/anomalies.py) beside the seen
    # ones. Off: two trainings with 40 (and one with 80) were no better than none on
    # development seeds (docs/benchmarks.md#generic-synthetic-anomalies).
    aova_synthetic_cases: int = 0
    # Modality-robust grounding (docs/method.md): copies of seen cases with random per-tissue
    # intensities, and lesion-free MR cases (MR anatomy only: MR lesions stay unseen).
    aova_randomised_cases: int = 20
    aova_mr_healthy_cases: int = 8
    # Organ grounding (networks/organs.py): a U-Net on the AOVA head's cases (seen types and
    # lesion-free) and lesion-free MR phantoms, trained first so the fusion is fitted on its organs.
    # 1600 steps: 1400-1950 beat 1000 on kidney, spleen and pancreas in every group and draw, and
    # with the geometric verifier below the whole method gained in every group (docs/method.md,
    # "Organ grounding"); 1600 rather than 2000 keeps `make demo-model` within 3 h on 2 cores.
    organ_steps: int = 1600
    organ_mr_healthy_cases: int = 16
    # The organ network also labels the vena cava and abdominal vessels and claims them, so that
    # no organ map takes them in (diffugts.networks.organs; docs/benchmarks.md, "Claimed
    # anatomy"). False: organs only.
    organ_claim_anatomy: bool = False
    # The share of its steps with generic lesions painted into the host organs and labelled as
    # the organ (diffugts.train.organs.with_painted_lesions). 0: painting moved the organ's
    # log-odds inside development lesions no more than noise against unpainted controls (two
    # draws, docs/benchmarks.md "A surer organ network").
    organ_anomaly_p: float = 0.0
    # The coarse map fuses the head with the organ-relative deviation; its threshold keeps this
    # share of the training lesion voxels (the refinement head verifies). None: the head alone.
    fusion_recall: float | None = 0.85
    # The organ's border the fusion leaves unscored: organ maps err at their edge, where the
    # next tissue then deviates like a lesion (docs/method.md, "organ-relative deviation").
    fusion_margin_mm: float = 5.0
    # The normative model (stages/normative.py): healthy appearance per organ and modality, from
    # lesion-free CT and MR phantoms (0 cases: none).
    normative_cases: int = 12
    normative_mr_cases: int = 12
    # Its candidates grow only from seeds where the organ network's log-odds exceed this (None:
    # from anywhere in the organ's interior), opened within each slice so that small lesions
    # seed (NormativeParams). Both: full method better in every group's mean and fewer false
    # lesions, two draws (docs/benchmarks.md, "Confident seeds").
    normative_seed_log_odds: float | None = 4.0
    normative_seed_opening: str = "slice"
    # Local texture features (standard deviation at these scales, mm): heterogeneous lesions that
    # keep their organ's mean intensity become unlikely. Two draws: full method CT seen and unseen
    # better in both, MR a little worse (docs/benchmarks.md, "Local texture").
    normative_texture_mm: tuple[float, ...] = (2.5,)
    # Local shape (Hessian eigenvalues) and depth among its features (NormativeParams.shape).
    # Without them: MR better in both draws, unseen CT a little worse, and a 50 mL false liver
    # lesion in each make-run study (docs/benchmarks.md, "Intensity-only normative model").
    normative_shape: bool = True
    # How unlike healthy tissue a voxel is (NormativeParams.score): "likelihood" under the organ's
    # mixture, or "discriminative", an anomaly discriminator trained against generic synthetic
    # anomalies. Two draws: full method CT unseen 0.21 -> 0.47 and MR 0.22 -> 0.26 on average,
    # CT seen 0.38 -> 0.32, about 1.5 more false lesions per lesion-free study (docs/benchmarks.md,
    # "Anomaly discriminator").
    normative_score: str = "discriminative"
    # Its healthy reference (NormativeParams.reference) and the lesion-free phantoms per modality
    # its thresholds are cut on (train_normative's calibration_cases; 0: held-out voxels). The
    # organ map as reference: false lesions per lesion-free study 3.25 / 3.5 -> 1.25 / 1.0, but
    # CT unseen 0.47 -> 0.43 and MR 0.27 -> 0.19, two draws (docs/benchmarks.md, "Healthy
    # reference as inference sees it"): not adopted.
    normative_reference: str = "organ"
    normative_calibration_cases: int = 0
    # The organ border its features and scores leave out (NormativeParams.margin_mm), as the
    # fusion's: organ maps err at their edge.
    normative_margin_mm: float = 5.0
    # ... but never leaving less than this share of an organ scored (NormativeParams.min_interior):
    # the 5 mm margin left the pancreas a third of its map and half of its lesions' voxels. With
    # 0.5 (of the organs that host lesions, the pancreas alone changes) two draws found 3 and 6
    # more of 45 lesions, at +0.17 / +0.33 false lesions per lesion-free CT study and -0.05 per
    # MR one (docs/benchmarks.md, "A thin organ's border").
    normative_min_interior: float = 0.5
    # Its features include the voxel's place in the organ (NormativeParams.position).
    normative_position: bool = False
    # Discriminators per organ and modality, each on lesion-free cases of its own, their mean
    # the score (stages.discriminator.Committee; docs/benchmarks.md "A committee of discriminators").
    normative_members: int = 1
    # The discriminator's healthy class also holds the ring around its painted anomalies
    # (NormativeParams.halo_mm; 0: none).
    normative_halo_mm: float = 0.0
    # Where its candidates grow, between the growing (-1) and the seed threshold (0)
    # (NormativeParams.grow_above).
    normative_grow_above: float = -1.0
    # How far its candidates grow from their seeds (NormativeParams.grow_mm; None: unlimited).
    # 9 mm raised Dice in every group of two draws and found more lesions wherever false lesions
    # are rarer than one per study (docs/benchmarks.md, "Growth from the seeds").
    normative_grow_mm: float | None = 9.0
    # What a verified candidate reports: the largest part its seeds reach above this (None: all
    # of it; NormativeParams.delineate_above). -0.5 raised Dice in every group of two draws on
    # dev16, but on a fresh development set it cost CT detection (the largest part is not
    # always the lesion's): not adopted (docs/benchmarks.md, "Delineation of verified candidates").
    normative_delineate_above: float | None = None
    # Or by level (NormativeParams.delineate_level; diffugts.stages.delineation): the verified
    # candidate's voxels on its lesion's side of this fraction of the way from its organ's
    # level to its core's, within delineate_expand_mm of it; a candidate it would split is
    # reported whole. Dice up in 14 of 16 cells of two draws on three development sets (-0.006
    # and -0.002 in the others), no lesion lost, no false lesion added (docs/benchmarks.md,
    # "Delineation by level").
    normative_delineate_level: float | None = 0.4
    normative_delineate_expand_mm: float = 3.0
    refine_cases: int = 30
    refine_steps: int = 900
    refine_healthy_cases: int = 12  # lesion-free cases: their coarse candidates teach the head to say "nothing"
    # The lesion verifier (diffugts.stages.verification), fitted on cases the refinement head never
    # saw; 0 cases: no verifier. Needs the fused coarse map (its deviation is evidence).
    verifier_cases: int = 36
    verifier_healthy_cases: int = 14
    # Its candidates: components of the head's mask ("refined"), of the deviation |z| > k
    # ("deviation"), or the normative model's ("normative"; the head's map then evidence about
    # each). "normative": better than "refined" in every group and on lesion-free studies, two
    # draws (docs/benchmarks.md, "Normative appearance"); "deviation" was no better.
    verifier_candidates: str = "normative"
    verifier_deviation_k: float = 2.0
    # The component features it weighs (None: the original seven): geometry, no evidence shaped by
    # the seen lesion types (the coarse map, the head's probability), and a threshold that keeps
    # 90 % of the fitting cases' true candidates (docs/method.md, "Lesion verification"). Depth
    # relative to the organ's thickness, not in mm, and no residual: fitted on examples made as
    # inference makes them the residual gets no weight, and in mm the thin organs' lesions lie
    # too shallow; MR +0.19, CT unchanged, two draws. Lesion-free MR fitting cases: off (they add
    # false candidates only; with the best-Dice threshold they cost MR lesions, one draw, offline).
    # Since 2026-12-06 also the volume of the candidate's clearly abnormal core (core_ml), with the
    # threshold keeping 95 %: fewer false lesions at each number of lesions found, two draws, three
    # development sets (docs/benchmarks.md, "A candidate's core"). Since the twenty-second session
    # also how far tissue like the candidate continues past it (continuation): 6-35 more lesions
    # found at each rate of at most 1.6 false lesions per lesion-free study, two draws, three
    # development sets (docs/benchmarks.md, "Continuation"). Since the twenty-sixth session also
    # how many look-alikes lesion-free studies raised near its place in its organ (lookalikes):
    # draw 0 half the false lesions at the same lesions found, draw 1 level or a few lesions more
    # along the whole curve (docs/benchmarks.md, "Look-alikes").
    verifier_features: tuple[str, ...] | None = ("core_ml", "depth_rel", "elongation", "continuation", "lookalikes")
    verifier_mr_healthy_cases: int = 0
    verifier_min_recall: float | None = 0.95
    # Lesion-free CT / MR cases with generic anomalies painted into every organ, their candidates
    # counted as lesions (train.anomalies.with_relative_anomalies): lesions of no type, in MR too.
    verifier_anomaly_cases: int = 0
    verifier_anomaly_mr_cases: int = 0
    # Lesion-free CT and as many MR phantoms whose normative candidates make the look-alike
    # atlas (diffugts.stages.lookalikes); 0: no atlas, and no ``lookalikes`` feature.
    verifier_lookalike_cases: int = 24
    # None: the backbone's default scales (default_features)
    features: list[str] | None = field(default_factory=lambda: list(AOVA_FEATURES))
    config: str = "demo"  # backbone configuration (models/configs.py): its family picks the backbone recipe
    phantom_shape: tuple[int, int, int] | None = None  # None: full-size phantoms; smaller for quick runs

    def __post_init__(self):
        normative = self.organ_steps and (self.normative_cases or self.normative_mr_cases)
        if self.verifier_cases and self.verifier_candidates == "normative" and not normative:
            raise ConfigError("a verifier of normative candidates needs the organ network and the normative model")

    def as_dict(self) -> dict:
        return asdict(self)

    def verifier_options(self) -> dict:
        """The keyword arguments of ``train_lesion_verifier`` this recipe sets."""
        return {
            "cases": self.verifier_cases,
            "healthy_cases": self.verifier_healthy_cases,
            "candidate_source": self.verifier_candidates,
            "deviation_k": self.verifier_deviation_k,
            "features": tuple(self.verifier_features) if self.verifier_features else None,
            "mr_healthy_cases": self.verifier_mr_healthy_cases,
            "min_recall": self.verifier_min_recall,
            "anomaly_cases": self.verifier_anomaly_cases,
            "anomaly_mr_cases": self.verifier_anomaly_mr_cases,
            "lookalike_cases": self.verifier_lookalike_cases,
        }

    def normative_params(self):
        """The normative model's parameters this recipe sets (the rest: NormativeParams')."""
        from diffugts.stages.normative import NormativeParams

        return NormativeParams(
            seed_log_odds=self.normative_seed_log_odds,
            seed_opening=self.normative_seed_opening,
            texture_mm=self.normative_texture_mm,
            shape=self.normative_shape,
            score=self.normative_score,
            reference=self.normative_reference,
            margin_mm=self.normative_margin_mm,
            min_interior=self.normative_min_interior,
            position=self.normative_position,
            members=self.normative_members,
            halo_mm=self.normative_halo_mm,
            grow_above=self.normative_grow_above,
            grow_mm=self.normative_grow_mm,
            delineate_above=self.normative_delineate_above,
            delineate_level=self.normative_delineate_level,
            delineate_expand_mm=self.normative_delineate_expand_mm,
        )

    @classmethod
    def quick(cls, seed: int = 0) -> DemoRecipe:
        """A few minutes instead of most of an hour: for tests and smoke runs."""
        return cls(
            seed=seed,
            backbone_cases=6,
            vae_steps=30,
            denoiser_steps=30,
            aova_cases=6,
            aova_steps=40,
            aova_dim=16,
            refine_cases=4,
            refine_steps=30,
            aova_randomised_cases=2,
            aova_mr_healthy_cases=1,
            refine_healthy_cases=1,
            verifier_cases=2,
            verifier_healthy_cases=1,
            verifier_lookalike_cases=1,
            organ_steps=6,
            organ_mr_healthy_cases=1,
            normative_cases=1,
            normative_mr_cases=1,
            phantom_shape=(32, 64, 64),
        )


# The 2D demo model keeps the heads it shipped with (no fusion, no randomisation, no
# lesion-free refinement cases): it has not been retrained since (docs/backbones-2d.md).
LEGACY_HEADS: dict[str, Any] = dict(
    organ_steps=0,
    aova_randomised_cases=0,
    aova_mr_healthy_cases=0,
    fusion_recall=None,
    refine_healthy_cases=0,
    verifier_cases=0,
    verifier_healthy_cases=0,
    normative_cases=0,
    normative_mr_cases=0,
)


def demo_2d(seed: int = 0) -> DemoRecipe:
    """The 2D demo model (``demo-2d``, the diffusers family): about 22 minutes on 2 idle CPU cores.

    Sized from timings of each part on the 2-core development machine (2026-11, torch 2.13,
    2 threads, machine otherwise idle; full-size phantoms: 64 slices of 128 x 128 on the
    model grid), per unit -> for this recipe:

    - backbone: phantom 0.32 s/case; VAE step (8 crops of 64 x 64) 0.07 s -> 70 s;
      latents 0.005 s/slice; denoiser step (16 latent crops of 16 x 16, captioned, token
      grounding) 0.19 s -> 375 s; about 7.7 min in all;
    - AOVA head: backbone features 11.7 s/case (the cross-attention probes are 6 of the 7
      UNet passes) for 12 + 4 held-out cases -> 190 s; head step (dim 16; the 2D features
      keep every slice, so the finest map is twice the 3D one) 0.9 s -> 360 s; about 9 min;
    - refinement head: features + synthesis (10 steps) + residuals ~15 s/case for 10 + 4
      held-out cases -> 210 s; head step 0.25 s -> 125 s; about 5.5 min.

    Sum: about 1350 s (22-23 min); synthesis grows with the coarse masks of the trained head,
    so allow 25.

    The same steps take 1.6-1.9 times longer on one thread, and far longer when another
    process competes for the two cores (two-thread runs then spin: run it alone).
    """
    return DemoRecipe(
        seed=seed,
        config="demo-2d",
        features=None,
        backbone_cases=24,
        vae_steps=1000,
        denoiser_steps=2000,
        aova_cases=12,
        aova_steps=400,
        aova_dim=16,
        refine_cases=10,
        refine_steps=500,
        **LEGACY_HEADS,
    )


def demo_2d_quick(seed: int = 0) -> DemoRecipe:
    """The 2D recipe on small phantoms (16 x 48 x 48) and a few steps: well under a minute,
    for tests and smoke runs (not a usable model)."""
    return DemoRecipe(
        seed=seed,
        config="demo-2d",
        features=None,
        backbone_cases=4,
        vae_steps=20,
        denoiser_steps=20,
        aova_cases=3,
        aova_steps=20,
        aova_dim=8,
        refine_cases=2,
        refine_steps=10,
        phantom_shape=(16, 48, 48),
        **LEGACY_HEADS,
    )


def recipe_for(config: str, quick: bool = False, seed: int = 0) -> DemoRecipe:
    """The demo recipe of a backbone configuration (``diffugts train demo --config``)."""
    if config == "demo":
        return DemoRecipe.quick(seed) if quick else DemoRecipe(seed=seed)
    if config == "demo-2d":
        return demo_2d_quick(seed) if quick else demo_2d(seed)
    raise ConfigError(f"no demo recipe for configuration {config!r} (demo, demo-2d)")
