"""Normative appearance: how unlike the *healthy* tissue of its organ each voxel looks.

The organ-relative deviation (diffugts.stages.deviation) asks whether a voxel is unlike its
organ's median. Healthy organs hold tissue that is: vessels in the liver, the renal sinus and
medulla in the kidney. So |z| flags normal anatomy as often as lesions; on development seeds,
with true organs, leaving those inner structures out took false components per lesion-free
study from 15-24 to 1-2 (docs/method.md, "normative appearance").

A normative model learns what healthy tissue of each organ looks like from lesion-free cases
only. No lesion label is used, so it favours no lesion type. Per organ and modality (CT, MR)
it is a Gaussian mixture over local appearance features (:data:`FEATURES`):
- organ-relative intensity: local means at three scales as robust z-scores (median, MAD);
- local shape: scale-normalised Hessian eigenvalues at two scales (tubes, sheets and blobs,
  bright or dark: a vessel is a tube, most lesions are not);
- depth below the organ's surface (the sinus lies deep in the kidney, the cortex at its rim);
  these two groups (shape and depth) can be left out (``shape=False``): intensity and texture
  only;
- local texture, where ``texture_mm`` asks for it: the local standard deviation, relative to
  the organ's spread. A rim-enhancing tumour with a necrotic core, or a mosaic one, can have its
  organ's mean intensity at every scale; it does not have its organ's texture.

A voxel's score is its negative log-likelihood under its organ's mixture, or (``score =
"discriminative"``) the log-odds of the organ's anomaly discriminator, an MLP over the same
features that learnt healthy tissue against generic synthetic anomalies painted into it
(diffugts.stages.discriminator), or the mean log-odds of a committee of such discriminators,
each fitted on lesion-free cases of its own (``members``), or (``score = "either"``) the larger
of the discriminator's and the mixture's scores, each relative to its own healthy quantiles
(:class:`Either`). The candidates are hysteresis components: voxels above the
``high_quantile`` of healthy voxels' scores, opened, grown through voxels above the
``low_quantile`` (or, with ``grow_above``, a threshold between the two). Like the deviation, scoring runs only in the
organ's interior (``margin_mm`` in from its surface), on the model grid.

Healthy reference (``reference``): the voxels of the true organ, or every voxel the organ map
grounds as the organ in lesion-free studies (the vena cava beside the liver, the kidney in the
liver's closed concavity, vessels along the pancreas): inference scores those too, and they are
healthy anatomy. Either way the quantiles are best cut on cases the model was not fitted on
(``train normative --calibration-cases``). :class:`Findings` carry, with the candidates, the
score they were cut from on one scale for every organ (:func:`relative_score`) and the organ
network's log-odds: evidence for the lesion verifier (diffugts.stages.verification).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import ndimage

from diffugts.stages.delineation import LevelDelineation
from diffugts.stages.deviation import (
    GAUSS_TRUNCATE,
    DeviationParams,
    local_mean,
    organ_box,
    organ_interior,
    robust_centre,
)
from diffugts.stages.discriminator import Committee, Discriminator

NORMATIVE = "normative"  # the package's network entry
FEATURES = (
    "mean_1.2mm",
    "mean_2.5mm",
    "mean_7mm",
    "hessian_2.75mm_1",
    "hessian_2.75mm_2",
    "hessian_2.75mm_3",
    "hessian_5.5mm_1",
    "hessian_5.5mm_2",
    "hessian_5.5mm_3",
    "depth",
)
SHAPE_FEATURES = FEATURES[3:]  # the Hessian eigenvalues and depth (NormativeParams.shape)
SEED_OPENINGS = ("volume", "slice")
SCORES = ("likelihood", "discriminative", "either")  # NormativeParams.score
REFERENCES = ("organ", "organ_map")  # NormativeParams.reference
MEAN_SCALES_MM = (1.2, 2.5, 7.0)
HESSIAN_SCALES_MM = (2.75, 5.5)
POSITION_FEATURES = ("position_k", "position_j", "position_i")  # NormativeParams.position (array axes)
TEXTURE_FLOOR = 0.05  # added to the relative local SD before its log


@dataclass(frozen=True)
class NormativeParams:
    """Decisions, each a parameter (defaults chosen on development seeds, docs/method.md)."""

    margin_mm: float = 5.0  # unscored organ border, as the fusion's (organ maps err at their edge)
    # The least share of an organ its scored interior keeps: where ``margin_mm`` would leave
    # less, the margin is halved, down to one voxel (a pancreas 10-20 mm thick kept a third of
    # itself, and half of its lesions' voxels, under 5 mm). 0: a fixed margin, as every model
    # fitted before 2026-12-06 (docs/benchmarks.md, "A thin organ's border").
    min_interior: float = 0.0
    depth_cap_mm: float = 30.0  # deeper than this is "deep"
    floor: float = 0.02  # the least robust SD (model intensity units)
    components: int = 12  # mixture components per organ and modality
    low_quantile: float = 0.95  # hysteresis: grow through voxels less likely than this share of healthy ones
    high_quantile: float = 0.995  # ... from seeds less likely than this share
    # Where candidates grow, on relative_score's scale (0 at the seed threshold, -1 at the
    # low_quantile's): -1 grows through every voxel past the low quantile; higher stops the
    # growth short of the halo of tissue next to a lesion (docs/benchmarks.md, "Delineation of verified candidates").
    grow_above: float = -1.0
    # How far (mm) a candidate grows from its seeds: 26-connected steps of the finest voxel
    # spacing, as many as fit (at least one). None: the whole component above the growing
    # threshold, as every model fitted before 2026-12-06. Growth ran along the sinus next to a
    # kidney lesion, the vein beside a pancreas one, the liver's mottled texture: 61-80 % of the
    # reported voxels outside a lesion lay more than 10 mm from it (docs/benchmarks.md, "Where
    # the Dice goes").
    grow_mm: float | None = None
    # Delineation: a verified candidate is reported as the part of it that the same seeds reach
    # through voxels above this (same scale; None: the whole candidate). The verifier still
    # judges whole candidates, as it was fitted; only the reported extent shrinks
    # (docs/benchmarks.md, "Delineation of verified candidates").
    delineate_above: float | None = None
    # Delineation by level (diffugts.stages.delineation): a verified candidate is reported as
    # its voxels on the lesion's side of this fraction of the way from its organ's level to its
    # core's, within ``delineate_expand_mm`` of it (None: the whole candidate). Changes where a
    # lesion is reported, never whether (docs/benchmarks.md, "Delineation by level").
    delineate_level: float | None = None
    delineate_expand_mm: float = 3.0
    # Seeds only where the organ network is this sure of the organ (log-odds; None: anywhere in
    # the scored interior). Its organ maps err at their border, and the next tissue, scored
    # under the organ's mixture, looks unlikely (docs/method.md, "normative appearance").
    seed_log_odds: float | None = None
    # The opening that turns lone unlikely voxels away as seeds: a cross in 3D ("volume") needs
    # three slices, so no lesion thinner than that (12 mm at 4 mm slices) seeds; "slice": a
    # cross within each slice, so small lesions on one or two slices do.
    seed_opening: str = "volume"
    # Scales (mm) of local standard deviation features; none (models fitted before 2026-12-04):
    # intensity, shape and depth only (docs/method.md, "normative appearance").
    texture_mm: tuple[float, ...] = ()
    # Local shape (Hessian eigenvalues) and depth among the features; False: organ-relative
    # intensity and texture only (docs/benchmarks.md, "Intensity-only normative model").
    shape: bool = True
    # How unlike healthy tissue a voxel is: "likelihood" (the mixture's negative log-likelihood;
    # models fitted before 2026-12-05), "discriminative" (the anomaly discriminator's log-odds;
    # docs/benchmarks.md, "Anomaly discriminator") or "either" (the larger of the two, each on
    # its own relative scale: :class:`Either`; docs/benchmarks.md, "Either score").
    score: str = "likelihood"
    # Which voxels of a lesion-free study are healthy reference (training only): "organ" (those
    # of the true organ; models fitted before 2026-12-05) or "organ_map" (every voxel the organ
    # map grounds as the organ: at inference the map also holds the vena cava, the next kidney,
    # vessels along the pancreas, and they are healthy anatomy too; docs/benchmarks.md,
    # "Healthy reference as inference sees it").
    reference: str = "organ"
    # The voxel's place in its organ (position within the organ's bounding box, 0..1 per axis):
    # healthy anatomy that looks like an anomaly sits in the same place in every study (the vena
    # cava at the liver's back, vessels along the pancreas), a lesion anywhere. False: models
    # fitted before 2026-12-05 (docs/benchmarks.md, "Delineation of verified candidates").
    position: bool = False
    # Discriminators per organ and modality, each fitted on lesion-free cases of its own; the
    # score is their mean log-odds (diffugts.stages.discriminator.Committee). 1: one, as every
    # model fitted before 2026-12-05 (fifteenth session).
    members: int = 1
    # Training only: the discriminator's healthy class also holds the voxels of the painted
    # copies that lie within this distance (mm) of a painted anomaly, from past its soft edge
    # (diffugts.train.normative.HALO_GAP_MM) out. Without them the ring that the coarse
    # features see around an anomaly was only ever shown with an anomaly in it, and the ring
    # around a lesion scored as anomalous. 0: none, as every model fitted before 2026-12-06
    # (docs/benchmarks.md, "The anomaly's halo").
    halo_mm: float = 0.0

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, not {self.reference!r}")
        if not -1.0 <= self.grow_above < 0.0:
            raise ValueError(f"grow_above must lie in [-1, 0) (between the thresholds), not {self.grow_above!r}")
        if self.grow_mm is not None and not self.grow_mm > 0:
            raise ValueError(f"grow_mm must be positive or None, not {self.grow_mm!r}")
        if self.delineate_above is not None and not -1.0 <= self.delineate_above < 0.0:
            raise ValueError(f"delineate_above must lie in [-1, 0) or be None, not {self.delineate_above!r}")
        if self.delineate_level is not None and not 0.0 < self.delineate_level < 1.0:
            raise ValueError(f"delineate_level must lie in (0, 1) or be None, not {self.delineate_level!r}")
        if self.delineate_level is not None and self.delineate_above is not None:
            raise ValueError("delineate_level and delineate_above are two delineations: set one")
        if self.delineate_expand_mm < 0:
            raise ValueError(f"delineate_expand_mm must be at least 0, not {self.delineate_expand_mm!r}")
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm must be at least 0, not {self.margin_mm!r}")
        if not 0.0 <= self.min_interior < 1.0:
            raise ValueError(f"min_interior must lie in [0, 1), not {self.min_interior!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {self.score!r}")
        if self.members < 1 or (self.members > 1 and not self.discriminative):
            raise ValueError(f"members must be 1, or more for a discriminative score, not {self.members!r}")
        if self.halo_mm < 0 or (self.halo_mm > 0 and not self.discriminative):
            raise ValueError(f"halo_mm must be 0, or positive for a discriminative score, not {self.halo_mm!r}")
        if self.seed_opening not in SEED_OPENINGS:
            raise ValueError(f"seed_opening must be one of {', '.join(SEED_OPENINGS)}, not {self.seed_opening!r}")
        texture = tuple(float(s) for s in self.texture_mm)  # a manifest holds a list
        if any(s <= 0 for s in texture):
            raise ValueError(f"texture_mm must hold positive scales, not {self.texture_mm!r}")
        object.__setattr__(self, "texture_mm", texture)

    @property
    def discriminative(self) -> bool:
        """Whether the score has an anomaly discriminator ("discriminative", "either")."""
        return self.score in ("discriminative", "either")

    @property
    def features(self) -> tuple[str, ...]:
        """The names of the features these parameters compute, in their columns' order."""
        base = FEATURES if self.shape else tuple(f for f in FEATURES if f not in SHAPE_FEATURES)
        return base + tuple(f"sd_{s:g}mm" for s in self.texture_mm) + (POSITION_FEATURES if self.position else ())

    @classmethod
    def from_dict(cls, d: dict | None) -> NormativeParams:
        return cls(**(d or {}))

    def as_dict(self) -> dict:
        """As the manifest holds them (JSON: lists, not tuples)."""
        return {**asdict(self), "texture_mm": list(self.texture_mm)}


def modality_group(modality: str) -> str:
    return "CT" if modality.upper() == "CT" else "MR"


def key(organ: str, modality: str) -> str:
    return f"{organ}/{modality_group(modality)}"


def family_of(k: str) -> str:
    """The organ family of a model key (:func:`key`'s inverse, in part)."""
    return k.split("/")[0]


def scored_interior(organ: np.ndarray, spacing_kji, params: NormativeParams) -> np.ndarray:
    """The part of ``organ`` the model scores: its interior, ``params.margin_mm`` in from its
    surface (less for a thin organ: ``params.min_interior``)."""
    return organ_interior(organ, spacing_kji, DeviationParams(margin_mm=params.margin_mm), params.min_interior)


def appearance_features(
    x: np.ndarray, organ: np.ndarray, spacing_kji, params: NormativeParams = NormativeParams()
) -> tuple[np.ndarray, np.ndarray]:
    """(the organ's scored interior (bool), its voxels' (N, len(FEATURES)) features). Computed
    on the organ's box (:func:`organ_box`: every filter here reaches no further), so the cost
    follows the organ's size, not the volume's."""
    organ = np.asarray(organ, bool)
    reach = max(GAUSS_TRUNCATE * max(MEAN_SCALES_MM + HESSIAN_SCALES_MM + params.texture_mm), params.margin_mm)
    box = organ_box(organ, spacing_kji, reach)
    scored = np.zeros(organ.shape, bool)
    scored[box], feats = _appearance_features(np.asarray(x)[box], organ[box], spacing_kji, params)
    return scored, feats


def _appearance_features(
    x: np.ndarray, organ: np.ndarray, spacing_kji, params: NormativeParams
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`appearance_features` on the volume it is given."""
    spacing = np.asarray(spacing_kji, float)
    scored = scored_interior(organ, spacing, params)
    if scored.sum() < 10:
        return np.zeros(organ.shape, bool), np.zeros((0, len(params.features)), np.float32)
    x = np.asarray(x, np.float32)
    means = [local_mean(x, organ, s, spacing) for s in MEAN_SCALES_MM]
    median, spread = robust_centre(means[1][scored], params.floor)
    columns = [(m[scored] - median) / spread for m in means]
    if params.shape:
        columns += _shape_columns(x, organ, scored, median, spread, spacing, params)
    for sigma_mm in params.texture_mm:
        # the local mean at a scale the intensity features already use is theirs
        mean = (
            means[MEAN_SCALES_MM.index(sigma_mm)]
            if sigma_mm in MEAN_SCALES_MM
            else local_mean(x, organ, sigma_mm, spacing)
        )
        square = local_mean(x * x, organ, sigma_mm, spacing)
        sd = np.sqrt(np.maximum(square - mean * mean, 0.0))[scored] / spread
        columns.append(np.log(sd + TEXTURE_FLOOR))  # log: noise-level texture is not squeezed near 0
    if params.position:
        columns += _position_columns(organ, scored)
    return scored, np.stack(columns, 1).astype(np.float32)


def _position_columns(organ: np.ndarray, scored: np.ndarray) -> list[np.ndarray]:
    """Each scored voxel's place along every array axis of the organ's bounding box (0 at its
    first voxel, 1 at its last; the model grid's orientation is fixed, so an axis means the same
    direction in every study). Relative to the organ's own extent, so the same on its box."""
    where = np.nonzero(scored)
    columns = []
    for axis, index in enumerate(where):
        extent = np.nonzero(organ.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        first, last = extent[0], extent[-1]
        columns.append((index - first) / max(last - first, 1))
    return columns


def hessian_at(image: np.ndarray, where: np.ndarray, sigma_mm: float, spacing, unit: float = 1.0) -> np.ndarray:
    """(N, 3, 3) float32: the scale-normalised Hessian (mm, Gaussian of ``sigma_mm``) of
    ``image`` at the N voxels of ``where``, in ``unit``s of intensity."""
    spacing = np.asarray(spacing, np.float64)
    hessian = np.empty((int(np.count_nonzero(where)), 3, 3), np.float32)
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            d = ndimage.gaussian_filter(image, sigma_mm / spacing, order=order)[where]
            hessian[:, a, b] = hessian[:, b, a] = d / (spacing[a] * spacing[b]) * sigma_mm**2 / unit
    return hessian


def _shape_columns(x, organ, scored, median, spread, spacing, params: NormativeParams) -> list[np.ndarray]:
    """The scored voxels' Hessian eigenvalues at each scale (ascending) and depth."""
    columns = []
    # Outside the organ the image is its median, so the organ's own border is not a "sheet".
    flat = np.where(organ, x, median).astype(np.float32)
    for sigma_mm in HESSIAN_SCALES_MM:
        columns += list(np.linalg.eigvalsh(hessian_at(flat, scored, sigma_mm, spacing, spread)).T)  # ascending
    depth = ndimage.distance_transform_edt(organ, sampling=spacing)[scored]
    columns.append(np.minimum(depth, params.depth_cap_mm) / 10.0)
    return columns


@dataclass
class Mixture:
    """One organ and modality's healthy appearance: a full-covariance Gaussian mixture, and the
    scores (negative log-likelihood) of the healthy voxels' ``low``/``high`` quantiles."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, F)
    scale_tril: np.ndarray  # (K, F, F) Cholesky factors of the covariances
    low: float
    high: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,) negative log-likelihood."""
        if len(features) == 0:
            return np.zeros(0, np.float32)
        with torch.no_grad():
            dist = torch.distributions.MixtureSameFamily(
                torch.distributions.Categorical(probs=torch.as_tensor(self.weights, dtype=torch.float64)),
                torch.distributions.MultivariateNormal(
                    torch.as_tensor(self.means, dtype=torch.float64),
                    scale_tril=torch.as_tensor(self.scale_tril, dtype=torch.float64),
                ),
            )
            return (-dist.log_prob(torch.as_tensor(features, dtype=torch.float64))).float().numpy()


@dataclass
class Either:
    """One organ and modality's discriminator and mixture together: a voxel is as unlike healthy
    tissue as the surer of the two says, each on its own :func:`relative_score` scale, and the
    larger is cut at quantiles of healthy voxels' scores (``low``/``high``) like any score.

    The discriminator learnt healthy tissue against painted anomalies, and beyond what was
    painted it extrapolates: healthy MR livers hold vessels 10-15 organ spreads from the organ's
    level, painted anomalies reach 6, so it called any such tissue healthy, a lesion of the
    vessels' intensity most surely (voxel AUC 0.43-0.52 on development seeds). The mixture calls
    tissue unlike every healthy voxel it saw unlikely, whatever was painted (0.95 there); the
    discriminator stays the surer one for subtle anomalies (docs/benchmarks.md, "Either score")."""

    discriminator: Discriminator | Committee
    mixture: Mixture
    low: float
    high: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,) the larger relative score of the two."""
        d, m = self.discriminator, self.mixture
        return np.maximum(
            relative_score(d.score(features), d.low, d.high), relative_score(m.score(features), m.low, m.high)
        )


@dataclass(frozen=True)
class Findings:
    """One target's normative findings on the model grid."""

    candidates: np.ndarray  # bool: the candidate lesion voxels
    score: np.ndarray  # float32: :func:`relative_score` of every voxel (-1 where unscored)
    log_odds: np.ndarray | None = None  # the organ network's for the target's organ, if it ran
    # bool: where the candidates' lesions lie (NormativeParams.delineate_above); None: the
    # candidates themselves
    delineation: np.ndarray | None = None
    # how the verified candidates are delineated by level (NormativeParams.delineate_level)
    level_delineation: LevelDelineation | None = None
    image: np.ndarray | None = None  # the image scored (the verifier's continuation reads it)
    key: str | None = None  # the organ and modality scored (:func:`key`; the verifier's look-alikes read it)

    @classmethod
    def none(cls, shape, log_odds: np.ndarray | None = None) -> Findings:
        """No candidates, every voxel unscored."""
        return cls(np.zeros(shape, bool), np.full(shape, -1.0, np.float32), log_odds)


def relative_score(score: np.ndarray, low: float, high: float) -> np.ndarray:
    """A score on one scale for every organ and modality: 0 at its seed threshold ``high``,
    -1 at its growing threshold ``low`` (where the healthy quantiles put them); unscored voxels
    (-inf) count as at the growing threshold. A verifier weighs how far a candidate stands
    above its own organ's healthy tissue, which raw log-odds or likelihoods do not say across
    organs."""
    rel = (np.asarray(score, np.float32) - high) / max(high - low, 1e-6)
    return np.where(np.isfinite(rel), rel, -1.0).astype(np.float32)


@dataclass
class NormativeModel:
    """Every organ and modality's :class:`Mixture` or, for ``params.score ==
    "discriminative"``, :class:`~diffugts.stages.discriminator.Discriminator`, or for
    "either" both and their :class:`Either` (keys ``organ/CT``, ``organ/MR``)."""

    params: NormativeParams
    mixtures: dict[str, Mixture] = field(default_factory=dict)
    discriminators: dict[str, Discriminator | Committee] = field(default_factory=dict)
    either: dict[str, Either] = field(default_factory=dict)  # its members are those of the two above

    @property
    def scorers(self) -> dict[str, Mixture | Discriminator | Committee | Either]:
        """Per key what scores a voxel (``score``) and the thresholds (``low``, ``high``)."""
        by_score = {"discriminative": self.discriminators, "either": self.either, "likelihood": self.mixtures}
        return by_score[self.params.score]  # type: ignore[return-value]

    def knows(self, organ: str | None, modality: str) -> bool:
        return organ is not None and key(organ, modality) in self.scorers

    def score_map(self, x: np.ndarray, organ_mask: np.ndarray, organ: str, modality: str, spacing_kji) -> np.ndarray:
        """The score of every voxel of the organ's interior (-inf elsewhere: a log-likelihood
        may be positive, so 0 would not mean "unscored")."""
        scored, feats = appearance_features(x, organ_mask, spacing_kji, self.params)
        out = np.full(np.shape(x), -np.inf, np.float32)
        out[scored] = self.scorers[key(organ, modality)].score(feats)
        return out

    def seed_maps(self, organ_net, x) -> dict:
        """Per organ the organ network's log-odds on ``x`` where :meth:`candidates` needs them
        (confident seeds: ``seed_log_odds``); empty otherwise, and without a network."""
        if self.params.seed_log_odds is None:
            return {}
        from diffugts.networks.organs import organ_maps

        return organ_maps(organ_net, x)

    def findings(
        self,
        x: np.ndarray,
        organ_mask: np.ndarray,
        organ: str,
        modality: str,
        spacing_kji,
        organ_log_odds: np.ndarray | None = None,
    ) -> Findings:
        """Candidate lesion voxels: hysteresis components of the score (none for an organ or
        modality the model has no scorer for), with the score they were cut from (the
        lesion verifier's evidence). ``organ_log_odds``: the organ network's for this organ
        (:func:`diffugts.networks.organs.organ_maps`), where ``seed_log_odds`` asks for
        confident seeds; without them every interior voxel may seed."""
        if not self.knows(organ, modality) or not np.any(organ_mask):
            return Findings.none(np.shape(x), organ_log_odds)
        mix = self.scorers[key(organ, modality)]
        where = self.seedable(organ_log_odds)
        score = self.score_map(x, organ_mask, organ, modality, spacing_kji)
        in_slices, steps = self.growth(spacing_kji)
        between = lambda rel: mix.low + (1.0 + rel) * (mix.high - mix.low)  # noqa: E731  (relative -> score)
        found = hysteresis(score, between(self.params.grow_above), mix.high, where, in_slices, steps)
        delineation = None
        if self.params.delineate_above is not None:
            delineation = found & hysteresis(
                score, between(self.params.delineate_above), mix.high, where, in_slices, steps
            )
        image = np.asarray(x)  # one array: the level delineation and the verifier's continuation read it
        by_level = None
        if self.params.delineate_level is not None:
            by_level = LevelDelineation(image, self.params.delineate_level, self.params.delineate_expand_mm)
        return Findings(
            found,
            relative_score(score, mix.low, mix.high),
            organ_log_odds,
            delineation,
            by_level,
            image,
            key(organ, modality),
        )

    def seedable(self, organ_log_odds: np.ndarray | None) -> np.ndarray | None:
        """Where candidates may seed (``seed_log_odds``); None: anywhere scored."""
        if self.params.seed_log_odds is None or organ_log_odds is None:
            return None
        return np.asarray(organ_log_odds) > self.params.seed_log_odds

    def growth(self, spacing_kji) -> tuple[bool, int | None]:
        """How seeds are opened (in slices or not) and how many steps candidates grow from them."""
        if self.params.grow_mm is None:
            return self.params.seed_opening == "slice", None
        steps = max(1, int(self.params.grow_mm // min(float(s) for s in spacing_kji)))
        return self.params.seed_opening == "slice", steps

    def reseeded(self, findings: Findings, spacing_kji, seed_above: float) -> np.ndarray:
        """The candidates ``findings`` would hold with seeds above ``seed_above`` on the
        relative score's scale (0: this model's seed threshold, -1: its growing one), grown as
        :meth:`findings` grows them: what a looser or stricter seed threshold would touch
        (benchmarks/candidate_curve.py)."""
        in_slices, steps = self.growth(spacing_kji)
        where = self.seedable(findings.log_odds)
        return hysteresis(findings.score, self.params.grow_above, seed_above, where, in_slices, steps)

    def candidates(self, *args, **kwargs) -> np.ndarray:
        """The candidate lesion voxels of :meth:`findings` (same arguments)."""
        return self.findings(*args, **kwargs).candidates

    def entry(self) -> dict:
        """The manifest entry (the arrays go to :meth:`state_dict`)."""
        return {
            "params": self.params.as_dict(),
            "features": list(self.params.features),
            "keys": sorted(self.scorers),
            "thresholds": {k: [m.low, m.high] for k, m in sorted(self.scorers.items())},
            **(
                {
                    "member_thresholds": {
                        k: {
                            "discriminative": [e.discriminator.low, e.discriminator.high],
                            "likelihood": [e.mixture.low, e.mixture.high],
                        }
                        for k, e in sorted(self.either.items())
                    }
                }
                if self.params.score == "either"
                else {}
            ),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, d in self.discriminators.items():
            out.update(d.state_dict(f"{k}.discriminator"))
        for k, m in self.mixtures.items():
            out[f"{k}.weights"] = torch.as_tensor(m.weights, dtype=torch.float32)
            out[f"{k}.means"] = torch.as_tensor(m.means, dtype=torch.float32)
            out[f"{k}.scale_tril"] = torch.as_tensor(m.scale_tril, dtype=torch.float32)
        return out

    @classmethod
    def load(cls, entry: dict, state: dict) -> NormativeModel:
        params = NormativeParams.from_dict(entry.get("params"))
        if tuple(entry.get("features", ())) != params.features:
            raise ValueError(f"unknown normative features {entry.get('features')!r}")
        low_high = {k: tuple(map(float, entry["thresholds"][k])) for k in entry["keys"]}
        members = entry.get("member_thresholds", {})
        if params.score == "either":  # each member's own thresholds
            own = {
                s: {k: tuple(map(float, members[k][s])) for k in entry["keys"]}
                for s in ("discriminative", "likelihood")
            }
        else:
            own = {params.score: low_high}
        discriminators: dict[str, Discriminator | Committee] = {}
        mixtures = {}
        if "discriminative" in own:
            discriminators = {
                k: Discriminator.load(state, f"{k}.discriminator", *own["discriminative"][k])
                if params.members == 1
                else Committee.load(state, f"{k}.discriminator", params.members, *own["discriminative"][k])
                for k in entry["keys"]
            }
        if "likelihood" in own:
            mixtures = {
                k: Mixture(
                    state[f"{k}.weights"].double().numpy(),
                    state[f"{k}.means"].double().numpy(),
                    state[f"{k}.scale_tril"].double().numpy(),
                    *own["likelihood"][k],
                )
                for k in entry["keys"]
            }
        either = {}
        if params.score == "either":
            either = {k: Either(discriminators[k], mixtures[k], *low_high[k]) for k in entry["keys"]}
        return cls(params, mixtures, discriminators, either)


def normative_of(pkg) -> NormativeModel | None:
    """The package's normative model, or None (packages made before it)."""
    if not pkg.has(NORMATIVE):
        return None
    return NormativeModel.load(pkg.network(NORMATIVE), pkg.state_dict(NORMATIVE))


def verifies_normative(pkg) -> bool:
    """Whether the package's lesion verifier takes the normative model's candidates."""
    from diffugts.config import REFINE_HEAD
    from diffugts.stages.verification import verifier_of

    if not pkg.has(REFINE_HEAD):
        return False
    verifier = verifier_of(pkg)
    return verifier is not None and verifier.candidate_source == "normative"


def target_candidates(pkg, organ_net, x: np.ndarray, space, modality: str, names, organs) -> list[Findings] | None:
    """Per target the normative model's findings on the model grid (candidate lesions inside
    its organ, the score, the organ log-odds); None unless the package's lesion verifier takes
    its candidates from there. ``x``/``space``: the study on the model grid; ``names``: each
    target's organ (None: no candidates); ``organs``: each target's organ with inclusions on
    the study grid (None: no candidates). The attention stage (which has synthesis inpaint
    the candidates) and refinement (which verifies them) call this alike, so that both see the
    same candidates."""
    from diffugts.errors import ConfigError
    from diffugts.networks.organs import organ_maps
    from diffugts.stages.verification import verifier_of

    if not verifies_normative(pkg):
        return None
    model = normative_of(pkg)
    if model is None:
        raise ConfigError(f"{pkg.root}: its lesion verifier takes normative candidates but it has no normative model")
    spacing = tuple(space.model.spacing)[::-1]
    # Confident seeds and the verifier need the organ network's log-odds. The attention
    # artifact carries the organ as a mask; the same frozen network on the same volume gives
    # them again (one pass) rather than a float map per target in every artifact.
    verifier = verifier_of(pkg)
    assert verifier is not None  # verifies_normative
    needs_log_odds = model.params.seed_log_odds is not None or "organ_log_odds" in verifier.features
    grounded = needs_log_odds and any(o is not None for o in organs)
    grounding = organ_maps(organ_net, x) if grounded else {}
    out = []
    for name, organ in zip(names, organs):
        if organ is None or name is None or not model.knows(name, modality):
            out.append(Findings.none(x.shape, grounding.get(name)))
            continue
        organ_model = space.to_model(organ.astype(np.float32), nearest=True) > 0.5
        out.append(model.findings(x, organ_model, name, modality, spacing, grounding.get(name)))
    return out


def delineated(kept: np.ndarray, delineation: np.ndarray) -> np.ndarray:
    """Each 26-connected component of ``kept`` (verified candidates) as the largest component of
    its part inside ``delineation``: one reported lesion per verified candidate, as before, so a
    candidate the tighter growth splits does not become several findings; a candidate with no
    delineated part keeps nothing."""
    whole, _ = ndimage.label(kept, structure=np.ones((3, 3, 3), bool))
    parts, n = ndimage.label(kept & delineation, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(np.shape(kept), bool)
    size = np.bincount(parts.ravel(), minlength=n + 1)[1:]
    parent = ndimage.maximum(whole, parts, np.arange(1, n + 1)).astype(int)  # each part lies in one candidate
    largest: dict[int, int] = {}  # candidate -> its largest part (the first one on a tie)
    for part in np.argsort(-size, kind="stable") + 1:
        largest.setdefault(int(parent[part - 1]), int(part))
    return np.isin(parts, list(largest.values()))


def hysteresis(
    score: np.ndarray,
    low: float,
    high: float,
    where: np.ndarray | None = None,
    in_slices: bool = False,
    steps: int | None = None,
) -> np.ndarray:
    """The components of ``score > low`` that hold a voxel of ``score > high`` opened (a single
    unlikely voxel is noise, not a seed; ``in_slices``: opened by a cross within each slice,
    else in 3D); ``where``: seeds only there (before the opening). ``steps``: only the voxels
    of ``score > low`` that many 26-connected steps from a seed, through such voxels.
    scikit-image has the plain filter; it is not a dependency."""
    above = score > low
    high_voxels = score > high if where is None else (score > high) & where
    cross = ndimage.generate_binary_structure(3, 1)
    if in_slices:
        cross[0] = cross[2] = False
    seeded = ndimage.binary_opening(high_voxels, structure=cross)
    if steps is not None:  # the seeds lie above ``low`` too, so the masked dilation keeps them
        return ndimage.binary_dilation(seeded, np.ones((3, 3, 3), bool), iterations=steps, mask=above)
    grown, n = ndimage.label(above, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return grown > 0
    seeds = np.unique(grown[seeded])
    return np.isin(grown, seeds[seeds > 0])
