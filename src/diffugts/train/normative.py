"""Fitting the normative model (diffugts.stages.normative) on lesion-free cases.

Each case's organs come from the package's organ network, closed over their inclusions exactly
as inference makes them (the fusion's deviation parameters), so the organ-relative features
are those inference will compute. Only voxels inside the case's *true* organ are samples: where
the network's organ spills into fat or the next organ is not healthy tissue of this organ,
and learning it as normal hid lesions (development seeds: docs/method.md, "normative
appearance"). Per organ and modality, half the samples fit a Gaussian mixture
(scikit-learn), or an anomaly discriminator against generic synthetic anomalies painted into
the same cases' organs (diffugts.stages.discriminator), and the other half set the score
quantiles the candidates are cut at.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from diffugts.networks.organs import OrganNet, organ_maps
from diffugts.stages.deviation import DeviationParams, organ_from_log_odds
from diffugts.stages.discriminator import Committee, Discriminator, fit_discriminator
from diffugts.stages.normative import (
    Either,
    Mixture,
    NormativeModel,
    NormativeParams,
    appearance_features,
    family_of,
    key,
    scored_interior,
)
from diffugts.train.anomalies import organ_relative_anomaly, organ_spread
from diffugts.train.aova import PROMPTABLE
from diffugts.train.data import TrainingCase
from diffugts.train.organs import organ_labels

MAX_SAMPLES = 60000  # voxels per organ and modality for the fit (as many again set the quantiles)
ANOMALY_COPIES = 3  # painted copies per case and organ for the anomaly discriminator
# The halo (NormativeParams.halo_mm) starts this far from a painted anomaly: its soft edge
# (RelativeAnomalySpec.edge_mm, up to 4 mm) still shifts the voxels nearer in.
HALO_GAP_MM = 4.0


def _case_organs(case: TrainingCase, organ_net: OrganNet, spacing_kji, deviation: DeviationParams):
    """Per organ family of the network: (family, its organ with inclusions as inference makes
    it, the case's true organ (lesions included))."""
    maps = organ_maps(organ_net, case.x)
    truth = organ_labels(case, list(maps))  # 1 + the index of each voxel's organ in maps
    for n, (fam, log_odds) in enumerate(maps.items()):
        if fam in PROMPTABLE:  # not the anatomy a network may label beside them
            yield fam, organ_from_log_odds(log_odds, spacing_kji, deviation), truth == n + 1


def ground_cases(cases: list[TrainingCase], organ_net: OrganNet, spacing_kji, deviation: DeviationParams) -> list:
    """Per case its :func:`_case_organs`, once: the healthy and the painted samples of a fit
    read the same organs (one organ-network pass per case instead of two)."""
    return [list(_case_organs(case, organ_net, spacing_kji, deviation)) for case in cases]


def only_organs(grounded: list, organs: Sequence[str] | None) -> list:
    """:func:`ground_cases`' output, only the organ families ``organs`` (None: all)."""
    return grounded if organs is None else [[o for o in case if o[0] in organs] for case in grounded]


# What a partial refit may change: where an organ is scored, and only where the kept organs'
# scored interiors stay the same (:func:`changed_interiors`). Everything else would change what
# the kept organs' scores or candidates mean.
INTERIOR_PARAMS = ("margin_mm", "min_interior")


def check_partial_refit(previous: NormativeParams, params: NormativeParams) -> None:
    """ValueError unless a model of ``params`` may keep some organs' fit from one of
    ``previous``: every parameter the same, except where an organ is scored (``INTERIOR_PARAMS``,
    checked on the cases by :func:`changed_interiors`)."""
    old, new = previous.as_dict(), params.as_dict()
    for name in sorted(old):
        if name not in INTERIOR_PARAMS and old[name] != new[name]:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"a partial refit keeps the other organs' fit, so {name} must stay {old[name]!r} "
                f"(pass {flag}), not {new[name]!r}"
            )


def changed_interiors(
    grounded: list, previous: NormativeParams, params: NormativeParams, spacing_kji, kept: Sequence[str]
) -> list[str]:
    """The families of ``kept`` whose scored interior on any of the ``grounded`` cases
    (:func:`ground_cases`) differs between ``previous`` and ``params``: their fit would not
    match what inference scores."""
    if all(getattr(previous, n) == getattr(params, n) for n in INTERIOR_PARAMS):
        return []
    changed = set()
    for case in grounded:
        for fam, organ, _ in case:
            if fam in kept and fam not in changed:
                before = scored_interior(organ, spacing_kji, previous)
                if not np.array_equal(before, scored_interior(organ, spacing_kji, params)):
                    changed.add(fam)
    return sorted(changed)


def refitted(previous: NormativeModel, fitted: NormativeModel, organs: Sequence[str]) -> NormativeModel:
    """``fitted``'s scorers for the organ families ``organs`` and ``previous``'s for every other
    key, under ``fitted``'s parameters. The other organs' scores and thresholds stay exactly as
    they were, so a change meant for some organs is measured on them alone. ValueError where
    the parameters differ beyond where organs are scored (:func:`check_partial_refit`), or
    where ``fitted`` lacks a key of ``organs`` that ``previous`` had (too few samples: the
    model would silently stop knowing it)."""
    check_partial_refit(previous.params, fitted.params)
    lost = sorted(k for k in previous.scorers if family_of(k) in organs and k not in fitted.scorers)
    if lost:
        raise ValueError(f"the refit has too few samples for {', '.join(lost)}, which the model knew: use more cases")

    def merge(old: dict, new: dict) -> dict:
        kept = {k: v for k, v in old.items() if family_of(k) not in organs}
        return dict(sorted({**kept, **{k: v for k, v in new.items() if family_of(k) in organs}}.items()))

    return NormativeModel(
        fitted.params,
        merge(previous.mixtures, fitted.mixtures),
        merge(previous.discriminators, fitted.discriminators),
        merge(previous.either, fitted.either),
    )


def _grounded(cases, organ_net, spacing_kji, deviation, grounded):
    return grounded if grounded is not None else (_case_organs(c, organ_net, spacing_kji, deviation) for c in cases)


def normative_samples(
    cases: list[TrainingCase],
    organ_net: OrganNet,
    spacing_kji,
    params: NormativeParams,
    deviation: DeviationParams | None = None,
    grounded: list | None = None,
) -> dict[str, np.ndarray]:
    """Per ``organ/modality`` key the (N, F) features of the healthy voxels of ``cases``: those
    of the true organ, or (``params.reference == "organ_map"``) every scored voxel of the organ
    as its map grounds it; ``deviation``: the parameters the package's organs are closed with
    (its fusion's); ``grounded``: the cases' organs if already grounded (:func:`ground_cases`)."""
    deviation = deviation or DeviationParams()
    found: dict[str, list[np.ndarray]] = defaultdict(list)
    for case, organs in zip(cases, _grounded(cases, organ_net, spacing_kji, deviation, grounded)):
        for fam, organ, true in organs:
            scored, feats = appearance_features(case.x, organ, spacing_kji, params)
            healthy = case.lesions[scored] == 0
            if params.reference == "organ":
                healthy &= true[scored]
            if healthy.any():
                found[key(fam, case.modality)].append(feats[healthy])
    return {k: np.concatenate(v) for k, v in found.items()}


def anomaly_samples(
    cases: list[TrainingCase],
    organ_net: OrganNet,
    spacing_kji,
    params: NormativeParams,
    deviation: DeviationParams | None = None,
    seed: int = 0,
    copies: int = ANOMALY_COPIES,
    grounded: list | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per ``organ/modality`` key the (N, F) features of generic synthetic anomalies
    (diffugts.train.anomalies.organ_relative_anomaly) painted into the true organs of
    ``cases``, ``copies`` painted copies per case and organ, scored inside the organ as
    inference scores it; ``grounded`` as for :func:`normative_samples`. And per key, for
    ``params.halo_mm`` > 0, the features of the copies' healthy voxels around the anomalies
    (HALO_GAP_MM to ``halo_mm`` away; empty for 0): (painted, halo)."""
    deviation = deviation or DeviationParams()
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_kji, float)
    found: dict[str, list[np.ndarray]] = defaultdict(list)
    halo: dict[str, list[np.ndarray]] = defaultdict(list)
    for case, organs in zip(cases, _grounded(cases, organ_net, spacing_kji, deviation, grounded)):
        for fam, organ, true in organs:
            host = true & organ & (case.lesions == 0)
            inner = scored_interior(host, spacing, params)
            if inner.sum() < 10:
                continue
            spread = organ_spread(case.x, organ, inner, spacing, params.floor)
            for _ in range(copies):
                x, painted = organ_relative_anomaly(case.x, host, spread, spacing, rng)
                if not painted.any():
                    continue
                scored, feats = appearance_features(x, organ, spacing_kji, params)
                if painted[scored].any():
                    found[key(fam, case.modality)].append(feats[painted[scored]])
                if params.halo_mm > 0:
                    away = ndimage.distance_transform_edt(~painted, sampling=spacing)
                    ring = (away > HALO_GAP_MM) & (away <= params.halo_mm) & host
                    if ring[scored].any():
                        halo[key(fam, case.modality)].append(feats[ring[scored]])
    return {k: np.concatenate(v) for k, v in found.items()}, {k: np.concatenate(v) for k, v in halo.items()}


def fit_normative(
    samples: dict[str, np.ndarray],
    params: NormativeParams,
    seed: int = 0,
    anomalies: dict[str, np.ndarray] | None = None,
    calibration: dict[str, np.ndarray] | None = None,
    members: Sequence[tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]] = (),
    halo: dict[str, np.ndarray] | None = None,
) -> NormativeModel:
    """A mixture per key with at least ``20 * components`` samples (fewer: the organ stays
    unknown to the model rather than be guessed from a handful of voxels); for ``params.score
    == "discriminative"`` an anomaly discriminator per such key that has ``anomalies`` (their
    features, :func:`anomaly_samples`) instead. The thresholds are the healthy quantiles of
    ``calibration`` (the healthy samples of other cases) where it has the key, else of half the
    samples, held out. Voxels of the cases a model was fitted on sit next to the voxels it saw,
    and a discriminator scores them lower than any new case's: on held-out voxels its
    thresholds flagged 2-4 % of new healthy organs' voxels where they should flag 0.5 %.
    ``members``: for ``params.members`` > 1, the (healthy, anomaly) samples of each further
    member's own cases; a key gets a :class:`Committee` where every member has enough of both,
    its thresholds cut on the mean score as one discriminator's are. ``halo``: per key, healthy
    voxels around painted anomalies (:func:`anomaly_samples`), which join the discriminator's
    healthy class but not the voxels its thresholds are cut on (they are not a new study's)."""
    from sklearn.mixture import GaussianMixture

    if params.discriminative and anomalies is None:
        raise ValueError(f"a {params.score} normative model needs anomaly samples")
    if len(members) != params.members - 1:
        raise ValueError(f"{params.members} members need the samples of {params.members - 1} more, not {len(members)}")
    rng = np.random.default_rng(seed)
    mixtures: dict[str, Mixture] = {}
    discriminators: dict[str, Discriminator | Committee] = {}
    either: dict[str, Either] = {}
    for k, x in sorted(samples.items()):
        if len(x) < 20 * params.components:
            continue
        x = x[rng.permutation(len(x))]
        if calibration is not None and k in calibration:
            held_out = calibration[k]
            fit_on, held_out = x[:MAX_SAMPLES], held_out[rng.permutation(len(held_out))][:MAX_SAMPLES]
        else:
            fit_on, held_out = x[: min(MAX_SAMPLES, len(x) // 2)], x[len(x) // 2 :][:MAX_SAMPLES]
        found: list = []  # this key's scorers: a discriminator, a mixture, or both ("either")
        if params.discriminative:
            painted = (anomalies or {}).get(k)
            if painted is None or len(painted) < 20 * params.components:
                continue
            ring = (halo or {}).get(k)
            healthy = (
                fit_on if ring is None else np.concatenate([fit_on, ring[rng.permutation(len(ring))][:MAX_SAMPLES]])
            )
            first = fit_discriminator(painted[rng.permutation(len(painted))][:MAX_SAMPLES], healthy, seed)
            more = [_member(h.get(k), (a or {}).get(k), params, rng, seed + m) for m, (h, a) in enumerate(members, 1)]
            fitted = [d for d in more if d is not None]
            if len(fitted) < len(more):
                continue  # a committee needs every member
            discriminators[k] = Committee([first, *fitted], 0.0, 0.0) if fitted else first
            found.append(discriminators[k])
        if params.score != "discriminative":
            gmm = GaussianMixture(params.components, covariance_type="full", reg_covar=1e-3, random_state=seed)
            gmm.fit(fit_on)
            tril = np.linalg.cholesky(gmm.covariances_)
            mixtures[k] = Mixture(gmm.weights_, gmm.means_, tril, 0.0, 0.0)
            found.append(mixtures[k])
        if params.score == "either":  # the members' thresholds first: the larger of their relative scores is cut
            either[k] = Either(discriminators[k], mixtures[k], 0.0, 0.0)
            found.append(either[k])
        for scorer in found:
            low, high = np.quantile(scorer.score(held_out), [params.low_quantile, params.high_quantile])
            scorer.low, scorer.high = float(low), float(high)
    return NormativeModel(params, mixtures, discriminators, either)


def _member(healthy, painted, params: NormativeParams, rng, seed: int) -> Discriminator | None:
    """A further committee member's discriminator, fitted on its own cases' samples (all of
    them: the committee's thresholds are cut on voxels of other cases), or None if too few."""
    if healthy is None or painted is None or min(len(healthy), len(painted)) < 20 * params.components:
        return None
    fit_on = healthy[rng.permutation(len(healthy))][:MAX_SAMPLES]
    return fit_discriminator(painted[rng.permutation(len(painted))][:MAX_SAMPLES], fit_on, seed)
