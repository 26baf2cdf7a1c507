"""Fitting the normative model (diffugts.stages.normative) on lesion-free cases.

Each case's organs come from the package's organ network, closed over their inclusions exactly
as inference makes them (the fusion's deviation parameters), so the organ-relative features
are those inference will compute. Only voxels inside the case's *true* organ are samples: where
the network's organ spills into fat or the next organ is not healthy tissue of this organ,
and learning it as normal hid lesions (development seeds: docs/method.md, "normative
appearance"). Per organ and modality, half the samples fit a Gaussian mixture
(scikit-learn) and the other half set the score quantiles the candidates are cut at.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from diffugts.networks.organs import OrganNet, organ_maps
from diffugts.stages.deviation import DeviationParams, organ_with_inclusions
from diffugts.stages.normative import Mixture, NormativeModel, NormativeParams, appearance_features, key
from diffugts.train.data import TrainingCase
from diffugts.train.organs import organ_labels

MAX_SAMPLES = 60000  # voxels per organ and modality for the fit (as many again set the quantiles)


def normative_samples(
    cases: list[TrainingCase],
    organ_net: OrganNet,
    spacing_kji,
    params: NormativeParams,
    deviation: DeviationParams | None = None,
) -> dict[str, np.ndarray]:
    """Per ``organ/modality`` key the (N, F) features of the healthy voxels of ``cases``;
    ``deviation``: the parameters the package's organs are closed with (its fusion's)."""
    deviation = deviation or DeviationParams()
    found: dict[str, list[np.ndarray]] = defaultdict(list)
    for case in cases:
        maps = organ_maps(organ_net, case.x)
        truth = organ_labels(case, list(maps))  # 1 + the index of each voxel's organ in maps
        for n, (fam, log_odds) in enumerate(maps.items()):
            organ = organ_with_inclusions(log_odds > 0, spacing_kji, deviation)
            scored, feats = appearance_features(case.x, organ, spacing_kji, params)
            healthy = (truth[scored] == n + 1) & (case.lesions[scored] == 0)
            if healthy.any():
                found[key(fam, case.modality)].append(feats[healthy])
    return {k: np.concatenate(v) for k, v in found.items()}


def fit_normative(samples: dict[str, np.ndarray], params: NormativeParams, seed: int = 0) -> NormativeModel:
    """A mixture per key with at least ``20 * components`` samples (fewer: the organ stays
    unknown to the model rather than be guessed from a handful of voxels)."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    mixtures = {}
    for k, x in sorted(samples.items()):
        if len(x) < 20 * params.components:
            continue
        x = x[rng.permutation(len(x))]
        fit_on, held_out = x[: min(MAX_SAMPLES, len(x) // 2)], x[len(x) // 2 :][:MAX_SAMPLES]
        gmm = GaussianMixture(params.components, covariance_type="full", reg_covar=1e-3, random_state=seed)
        gmm.fit(fit_on)
        mix = Mixture(gmm.weights_, gmm.means_, np.linalg.cholesky(gmm.covariances_), 0.0, 0.0)
        low, high = np.quantile(mix.score(held_out), [params.low_quantile, params.high_quantile])
        mix.low, mix.high = float(low), float(high)
        mixtures[k] = mix
    return NormativeModel(params, mixtures)
