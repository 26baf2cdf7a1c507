"""Training commands: each produces (or extends) a model package with its provenance."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffugts.config import AOVA_HEAD, ORGAN_NET, REFINE_HEAD
from diffugts.errors import ConfigError
from diffugts.models.configs import get_config
from diffugts.models.create import base_manifest
from diffugts.models.package import ModelPackage, add_networks, open_package, write_package
from diffugts.networks.backbones import build_backbone, load_backbone
from diffugts.networks.organs import load_organ_net
from diffugts.networks.text import TextEncoder
from diffugts.stages.deviation import DeviationParams
from diffugts.stages.normative import NORMATIVE, NormativeParams, family_of, normative_of
from diffugts.stages.preprocess import Preprocessing
from diffugts.train import recipe as R
from diffugts.train.data import phantom_case
from diffugts.utils.progress import progress

log = logging.getLogger(__name__)
KEEP = "keep"  # train_lesion_verifier(grow_mm=KEEP): the package's own growth


def command_line() -> str:
    """The command that is running, for provenance: ``diffugts ...`` for the CLI (its console
    script or ``python -m diffugts``), ``python SCRIPT ...`` for a script such as
    benchmarks/train_heads.py, which calls the training functions itself."""
    if not sys.argv:
        return ""
    program = Path(sys.argv[0]).name
    head = ["diffugts"] if program in ("diffugts", "__main__.py") else ["python", sys.argv[0]]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def backbone_cases(prep: Preprocessing, n: int, seed: int, show: bool, shape=None):
    """Half healthy, half seen-lesion CT cases of the backbone's seed range."""
    return [
        phantom_case(R.BACKBONE_SEED + seed, i, prep, split="seen", healthy=(i % 2 == 0), shape=shape)
        for i in progress(range(n), desc="phantoms", unit="case", enable=show)
    ]


def train_backbone(
    out: Path,
    config_name: str = "demo",
    seed: int = 0,
    cases: int = 48,
    vae_steps: int = 1500,
    denoiser_steps: int = 1500,
    show_progress: bool = True,
    phantom_shape=None,
) -> ModelPackage:
    """Train a demo-size backbone of the configuration's family (3D MAISI-like, or the 2D
    diffusers family: :mod:`diffugts.train.backbone2d`) on phantoms and write its package."""
    torch.manual_seed(seed)
    config = get_config(config_name)
    prep = Preprocessing.from_dict(config["preprocessing"])
    data = backbone_cases(prep, cases, seed, show_progress, phantom_shape)
    backbone = build_backbone({**config, "scale_factor": 1.0})
    if config["family"] == "diffusers2d":
        from diffugts.networks.backbones.diffusers2d import Diffusers2DBackbone
        from diffugts.train.backbone2d import fit_backbone_2d

        assert isinstance(backbone, Diffusers2DBackbone)  # what build_backbone makes for the family
        fitted = fit_backbone_2d(backbone, data, vae_steps, denoiser_steps, seed, show_progress)
        config["vae"] = backbone.config["vae"]  # carries the trained latent scaling_factor
    else:
        from diffugts.networks.backbones.maisi import MaisiBackbone
        from diffugts.train.backbone import fit_backbone_3d

        assert isinstance(backbone, MaisiBackbone)
        fitted = fit_backbone_3d(backbone, data, vae_steps, denoiser_steps, seed, prep.spacing_mm, show_progress)
    training = {
        "cases": cases,
        "case_seed": R.BACKBONE_SEED + seed,
        "vae_steps": vae_steps,
        "denoiser_steps": denoiser_steps,
        "vae_loss_first_last": _ends(fitted.vae_curve),
        "denoiser_loss_first_last": _ends(fitted.unet_curve),
        "vae_seconds": round(fitted.vae_seconds, 1),
        "denoiser_seconds": round(fitted.denoiser_seconds, 1),
        **{f"{name}_loss_first_last": _ends(curve) for name, curve in fitted.curves.items()},
        **fitted.details,
    }
    if phantom_shape:
        training["phantom_shape"] = list(phantom_shape)
    manifest = base_manifest(
        f"{config_name}-phantom",
        config_name,
        config,
        backbone.scale_factor,
        {"kind": "trained", "command": command_line(), "seed": seed, "backbone_training": training},
    )
    return write_package(out, manifest, {"vae": backbone.vae.state_dict(), "unet": backbone.unet.state_dict()})


def train_aova_head(
    model: str | Path,
    out: Path | None = None,
    seed: int = 0,
    cases: int = 60,
    steps: int = 1200,
    dim: int = 64,
    features: list[str] | None = None,
    show_progress: bool = True,
    phantom_shape=None,
    synthetic_cases: int = 0,
    randomised_cases: int = 0,
    mr_healthy_cases: int = 0,
    fusion_recall: float | None = None,
    fusion_margin_mm: float = 0.0,
    source=None,
    checkpoint=None,
    device: str | None = None,
) -> ModelPackage:
    """``source``: real datasets (:class:`diffugts.datasets.training.DatasetSource`) beside the
    ``cases`` phantoms; ``checkpoint``: resumable training (diffugts.train.checkpoint);
    ``device``: where the frozen backbone runs (features), the head trains on the CPU.
    ``synthetic_cases``: healthy cases with generic synthetic anomalies added to the seen
    ones (diffugts.train.anomalies); ``randomised_cases``: copies of seen cases with random
    per-tissue intensities (diffugts.train.randomise); ``mr_healthy_cases``: lesion-free MR
    phantoms (MR anatomy; MR lesions stay unseen); ``fusion_recall``: fit the coarse-map
    fusion with the organ-relative deviation (diffugts.stages.deviation) at this voxel recall,
    the organ's border of ``fusion_margin_mm`` left unscored."""
    from diffugts.train.anomalies import add_anomalies
    from diffugts.train.aova import evaluate_dice, train_aova
    from diffugts.train.randomise import randomise

    pkg = open_package(model)
    prep = Preprocessing.from_dict(pkg.manifest["preprocessing"])
    backbone = load_backbone(pkg, device or "cpu")
    features = features or R.default_features(backbone)
    text = TextEncoder()
    spacing_kji = tuple(prep.spacing_mm)[::-1]
    organ_net = load_organ_net(pkg)
    data = _seen_range_cases(prep, seed, cases, phantom_shape, show_progress, source)
    real = len(data)  # phantoms and dataset cases: what the fusion is fitted on
    rng = np.random.default_rng([R.AOVA_SEED + seed, R.SYNTHETIC_STREAM])
    data += [
        add_anomalies(
            phantom_case(
                R.AOVA_SEED + seed, R.SYNTHETIC_INDEX + i, prep, split="seen", healthy=True, shape=phantom_shape
            ),
            prep,
            rng,
        )
        for i in progress(range(synthetic_cases), desc="synthetic anomalies", unit="case", enable=show_progress)
    ]
    rng = np.random.default_rng([R.AOVA_SEED + seed, R.RANDOMISE_STREAM])
    seen = [c for c in data if c.records] or data
    data += [
        randomise(seen[i % len(seen)], rng, spacing_kji)
        for i in progress(range(randomised_cases), desc="randomised", unit="case", enable=show_progress)
    ]
    data += _mr_healthy_cases(prep, seed, mr_healthy_cases, phantom_shape, show_progress)
    held_out = [
        phantom_case(R.AOVA_SEED + seed + 500, i, prep, split="seen", shape=phantom_shape)
        for i in range(4 if cases or not source else 0)
    ]
    held_out += list(source.held_out_cases(prep)) if source else []
    t0 = time.perf_counter()
    result = train_aova(
        backbone,
        text,
        data,
        feature_names=features,
        spacing=prep.spacing_mm,
        steps=steps,
        seed=seed,
        dim=dim,
        show_progress=show_progress,
        checkpoint=checkpoint,
    )
    seconds = time.perf_counter() - t0
    rows = evaluate_dice(result.head, backbone, text, held_out, features, prep.spacing_mm)
    val = float(np.mean([r["dice"] for r in rows])) if rows else None
    entry = {"config": result.head.config, "features": features, "threshold": 0.5}
    fusion_info = {}
    if fusion_recall is not None:
        # Fitted on the seen CT cases with lesions (randomised copies and MR left out: the
        # deviation's scale is what is fitted, and those copies have no new lesions).
        fit_on = [cf for cf in result.data[: real + synthetic_cases] if cf.positives]
        deviation = DeviationParams(margin_mm=fusion_margin_mm)
        fusion_info = _fit_fusion(
            entry, result.head, text, fit_on, spacing_kji, seed, fusion_recall, organ_net, deviation
        )
    losses = [h["loss"] for h in result.history]
    return add_networks(
        pkg,
        {AOVA_HEAD: (entry, result.head.state_dict())},
        out=out,
        provenance={
            "aova_training": {
                "command": command_line(),
                "seed": seed,
                "cases": cases,
                "case_seed": R.AOVA_SEED + seed,
                "synthetic_cases": synthetic_cases,
                "randomised_cases": randomised_cases,
                "mr_healthy_cases": mr_healthy_cases,
                "synthetic_lesions": sum(r["type"] == "synthetic" for c in data for r in c.records),
                "steps": steps,
                "dim": dim,
                "loss_first_last": _ends(losses),
                "seconds": round(seconds, 1),
                "held_out_seen_dice": None if val is None else round(val, 4),
                **fusion_info,
                **({"datasets": source.provenance()} if source else {}),
            }
        },
    )


def _seen_range_cases(prep: Preprocessing, seed: int, cases: int, shape, show_progress: bool, source=None) -> list:
    """The AOVA seed range's CT cases (seen lesion types, one in six lesion-free) and the
    dataset cases beside them: what the AOVA head and the organ network train on."""
    data = [
        phantom_case(R.AOVA_SEED + seed, i, prep, split="seen", healthy=(i % 6 == 0), shape=shape)
        for i in progress(range(cases), desc="phantoms", unit="case", enable=show_progress)
    ]
    return data + (list(source.training_cases(prep)) if source else [])


def _mr_healthy_cases(prep: Preprocessing, seed: int, n: int, shape, show_progress: bool) -> list:
    """Lesion-free MR phantoms of the AOVA seed range (MR anatomy; MR lesions stay unseen)."""
    return [
        phantom_case(R.AOVA_SEED + seed, R.MR_INDEX + i, prep, healthy=True, modality="MR", shape=shape)
        for i in progress(range(n), desc="MR healthy", unit="case", enable=show_progress)
    ]


def _fit_fusion(
    entry: dict, head, text, fit_on, spacing_kji, seed: int, recall: float, organ_net, deviation: DeviationParams
) -> dict:
    """Fit the coarse-map fusion on ``fit_on`` (CaseFeatures of seen cases with lesions), with
    the organs inference will use and the ``deviation`` parameters it records; put it and its
    threshold into the AOVA ``entry``."""
    from diffugts.train.fusion import fit_fusion, fusion_samples

    samples = fusion_samples(head, text, fit_on, spacing_kji, deviation, seed, organ_net)
    fusion, threshold = fit_fusion(*samples, deviation, recall=recall)
    entry.update(fusion=fusion.as_dict(), threshold=round(threshold, 4))
    return {
        "fusion_cases": len(fit_on),
        "fusion_voxels": int(len(samples[1])),
        "fusion_recall": recall,
        "fusion_margin_mm": deviation.margin_mm,
    }


def train_organ_net(
    model: str | Path,
    out: Path | None = None,
    seed: int = 0,
    cases: int = 40,
    steps: int = 1000,
    mr_healthy_cases: int = 16,
    show_progress: bool = True,
    phantom_shape=None,
    source=None,
    refit_fusion: bool = True,
    device: str | None = None,
    claim_anatomy: bool = False,
    anomaly_p: float = 0.0,
    fine_tune: bool = False,
    lr: float | None = None,
) -> ModelPackage:
    """Organ grounding (diffugts.networks.organs) on the AOVA seed range's cases (seen lesion
    types and lesion-free cases, as the AOVA head; ``source``: dataset cases beside them) and
    ``mr_healthy_cases`` lesion-free MR phantoms. With ``refit_fusion``, a package whose AOVA
    head already has a fusion gets it refitted on the new organs (its refinement head, if any,
    was trained on the old ones: retrain it for a consistent package). ``device``: where the
    network trains (a GPU for full-size volumes). ``claim_anatomy``: the network also labels
    the vena cava and the abdominal vessels (diffugts.networks.organs.ANATOMY), and claims
    them, so that no organ's inclusions take them in. ``anomaly_p``: the share of steps with
    generic lesions painted into the host organs and labelled as the organ
    (diffugts.train.organs). ``fine_tune``: start from the package's organ network (its
    organs and config; ``claim_anatomy`` must match it) rather than from scratch. ``lr``: the
    peak learning rate (default 3e-3 from scratch, 1e-3 fine-tuning)."""
    from diffugts.networks.aova import AOVAHead
    from diffugts.networks.loading import load_head
    from diffugts.networks.organs import ANATOMY, CLAIM_LOG_ODDS
    from diffugts.train.aova import case_features
    from diffugts.train.organs import ORGANS, organ_dice, train_organs

    if not 0.0 <= anomaly_p <= 1.0 or (lr is not None and lr <= 0):
        raise ConfigError(f"--anomaly-p must lie in [0, 1] and --lr be positive (got {anomaly_p}, {lr})")
    lr = lr or (1e-3 if fine_tune else 3e-3)
    pkg = open_package(model)
    prep = Preprocessing.from_dict(pkg.manifest["preprocessing"])
    spacing_kji = tuple(prep.spacing_mm)[::-1]
    organs = ORGANS + list(ANATOMY) if claim_anatomy else ORGANS
    net_config: dict = {"claim_log_odds": CLAIM_LOG_ODDS} if claim_anatomy else {}
    init, start = None, None
    if fine_tune:
        if not pkg.has(ORGAN_NET):
            raise ConfigError(f"{pkg.root}: no organ network to fine-tune (train one without --fine-tune)")
        net_config = dict(pkg.network(ORGAN_NET)["config"])
        organs = list(net_config.pop("organs"))
        if (net_config.get("claim_log_odds") is not None) != claim_anatomy:
            raise ConfigError(f"{pkg.root}: --claim-anatomy must match the organ network being fine-tuned")
        init, start = pkg.state_dict(ORGAN_NET), pkg.manifest.get("provenance", {}).get("organ_training")
    data = _seen_range_cases(prep, seed, cases, phantom_shape, show_progress, source)
    real = len(data)
    data += _mr_healthy_cases(prep, seed, mr_healthy_cases, phantom_shape, show_progress)
    t0 = time.perf_counter()
    net, losses = train_organs(
        data,
        spacing_kji,
        steps=steps,
        seed=seed,
        lr=lr,
        show_progress=show_progress,
        device=device or "cpu",
        organs=organs,
        net_config=net_config or None,
        anomaly_p=anomaly_p,
        init=init,
    )
    seconds = time.perf_counter() - t0
    held_out = [  # the AOVA head's held-out range, and MR
        phantom_case(R.AOVA_SEED + seed + 500, i, prep, split="seen", shape=phantom_shape, modality=modality)
        for i, modality in enumerate(("CT", "CT", "MR", "MR") if cases else ())
    ]
    held_out += list(source.held_out_cases(prep)) if source else []
    held_out_dice = organ_dice(net.cpu(), held_out, spacing_kji)
    networks = {ORGAN_NET: ({"config": net.config}, net.state_dict())}
    aova = pkg.network(AOVA_HEAD) if pkg.has(AOVA_HEAD) else None
    fusion_info = {}
    if refit_fusion and aova and aova.get("fusion"):
        backbone = load_backbone(pkg, "cpu")
        head = load_head(pkg, AOVA_HEAD, AOVAHead)
        index = backbone.feature_index(aova["features"])
        fit_on = [case_features(backbone, c, index, prep.spacing_mm, seed) for c in data[:real] if c.records]
        entry = dict(aova)
        # The recall the head's own fusion was fitted at (the recipe's where unrecorded).
        recall = pkg.manifest.get("provenance", {}).get("aova_training", {}).get("fusion_recall")
        recall = recall or R.DemoRecipe().fusion_recall or 0.85
        deviation = DeviationParams.from_dict(aova["fusion"].get("deviation"))  # its own border margin
        fusion_info = _fit_fusion(entry, head, TextEncoder(), fit_on, spacing_kji, seed, recall, net, deviation)
        networks[AOVA_HEAD] = (entry, pkg.state_dict(AOVA_HEAD))
    return add_networks(
        pkg,
        networks,
        out=out,
        provenance={
            "organ_training": {
                "command": command_line(),
                "seed": seed,
                "cases": cases,
                "case_seed": R.AOVA_SEED + seed,
                "mr_healthy_cases": mr_healthy_cases,
                "steps": steps,
                "anomaly_p": anomaly_p,
                "lr": lr,
                **({"fine_tuned_from": start} if fine_tune else {}),
                "organs": net.organs,
                "loss_first_last": _ends(losses),
                "seconds": round(seconds, 1),
                "held_out_dice": held_out_dice,
                **({"refitted_fusion": fusion_info} if fusion_info else {}),
                **({"datasets": source.provenance()} if source else {}),
            }
        },
    )


def set_delineation(
    model: str | Path,
    out: Path | None = None,
    level: float | None = R.DemoRecipe.normative_delineate_level,
    expand_mm: float = R.DemoRecipe.normative_delineate_expand_mm,
) -> ModelPackage:
    """The package with its normative model's delineation by level set (NormativeParams.
    delineate_level, ``delineate_expand_mm``; diffugts.stages.delineation), nothing refitted:
    the parameters shape only how verified candidates are reported, so the weights and
    thresholds stay as they are (a refit draws other ones). ``level`` None: whole candidates."""
    from dataclasses import replace

    pkg = open_package(model)
    normative = normative_of(pkg)
    if normative is None:
        raise ConfigError(f"{pkg.root}: the package has no normative model (`diffugts train normative`)")
    try:
        normative.params = replace(normative.params, delineate_level=level, delineate_expand_mm=expand_mm)
    except ValueError as e:
        raise ConfigError(f"{pkg.root}: {e}") from None
    return add_networks(
        pkg,
        {NORMATIVE: (normative.entry(), normative.state_dict())},
        out=out,
        provenance={"delineation": {"command": command_line(), "level": level, "expand_mm": expand_mm}},
    )


def train_normative(
    model: str | Path,
    out: Path | None = None,
    seed: int = 0,
    cases: int = 12,
    mr_cases: int = 12,
    show_progress: bool = True,
    phantom_shape=None,
    params: NormativeParams | None = None,
    calibration_cases: int = 0,
    organs: Sequence[str] | None = None,
) -> ModelPackage:
    """The normative model (diffugts.stages.normative) of a package with an organ network, fitted
    on ``cases`` lesion-free CT and ``mr_cases`` lesion-free MR phantoms of the AOVA seed range:
    healthy anatomy only, no lesion of any type (diffugts.train.normative). Its thresholds are
    cut on ``calibration_cases`` more lesion-free phantoms per modality (0: on held-out voxels
    of the fitting cases). ``organs``: refit only these organ families and keep the package's
    fit of every other (diffugts.train.normative.refitted): for a change that concerns them
    alone, so that the other organs' candidates stay as they were."""
    from diffugts.stages.attend import deviation_of
    from diffugts.train.aova import PROMPTABLE
    from diffugts.train.normative import (
        anomaly_samples,
        changed_interiors,
        check_partial_refit,
        fit_normative,
        ground_cases,
        normative_samples,
        only_organs,
        refitted,
    )

    params = params or NormativeParams()
    pkg = open_package(model)
    net = load_organ_net(pkg)
    if net is None:
        raise ConfigError(f"{pkg.root}: the normative model needs an organ network (`diffugts train organs`)")
    previous = None
    if organs is not None:
        organs = sorted(set(organs))
        unknown = sorted(set(organs) - set(PROMPTABLE))
        if unknown or not organs:
            raise ConfigError(f"--organs: {', '.join(unknown) or 'none'} (organ families: {', '.join(PROMPTABLE)})")
        previous = normative_of(pkg)
        if previous is None:
            raise ConfigError(f"{pkg.root}: --organs refits part of a normative model, and it has none")
        try:
            check_partial_refit(previous.params, params)
        except ValueError as e:
            raise ConfigError(f"{pkg.root}: {e}") from None
    prep = Preprocessing.from_dict(pkg.manifest["preprocessing"])
    plan = [("CT", R.NORMATIVE_INDEX + i) for i in range(cases)]
    plan += [("MR", R.NORMATIVE_INDEX + R.NORMATIVE_MR_OFFSET + i) for i in range(mr_cases)]
    held_out = [("CT", R.NORMATIVE_INDEX + R.NORMATIVE_CALIBRATION_OFFSET + i) for i in range(calibration_cases)]
    held_out += [
        ("MR", R.NORMATIVE_INDEX + R.NORMATIVE_MR_OFFSET + R.NORMATIVE_CALIBRATION_OFFSET + i)
        for i in range(calibration_cases if mr_cases else 0)
    ]
    t0 = time.perf_counter()

    def phantoms(entries) -> list:
        return [
            phantom_case(R.AOVA_SEED + seed, i, prep, healthy=True, modality=modality, shape=phantom_shape)
            for modality, i in progress(entries, desc="healthy phantoms", unit="case", enable=show_progress)
        ]

    data, held_out_data = phantoms(plan), phantoms(held_out)
    spacing, deviation = tuple(prep.spacing_mm)[::-1], deviation_of(pkg) or DeviationParams()

    def sampled(cases: list, anomaly_seed: int):
        grounded = ground_cases(cases, net, spacing, deviation)
        if previous is not None and organs is not None:
            kept = sorted({family_of(k) for k in previous.scorers} - set(organs))
            changed = changed_interiors(grounded, previous.params, params, spacing, kept)
            if changed:
                raise ConfigError(
                    f"{pkg.root}: the new border settings change where {', '.join(changed)} "
                    "(kept, not refitted) would be scored: add them to --organs"
                )
        grounded = only_organs(grounded, organs)
        healthy = normative_samples(cases, net, spacing, params, deviation, grounded)
        if not params.discriminative:
            return healthy, None, {}
        return healthy, *anomaly_samples(cases, net, spacing, params, deviation, anomaly_seed, grounded=grounded)

    samples, anomalies, halo = sampled(data, seed)
    calibration = (
        normative_samples(
            held_out_data,
            net,
            spacing,
            params,
            deviation,
            only_organs(ground_cases(held_out_data, net, spacing, deviation), organs),
        )
        if held_out_data
        else None
    )
    # A committee's further members fit on cases of their own (params.members); a member's
    # healthy samples only fit it (no thresholds are cut on them), so its halo simply joins them.
    members = []
    for k in range(1, params.members):
        healthy, painted, ring = sampled(phantoms([(m, i + k * R.NORMATIVE_MEMBER_OFFSET) for m, i in plan]), seed + k)
        members.append(
            ({name: np.concatenate([v, ring[name]]) if name in ring else v for name, v in healthy.items()}, painted)
        )
    normative = fit_normative(samples, params, seed, anomalies, calibration, members, halo)
    if previous is not None and organs is not None:
        try:
            normative = refitted(previous, normative, organs)
        except ValueError as e:
            raise ConfigError(f"{pkg.root}: {e}") from None
    report = {
        "command": command_line(),
        "seed": seed,
        "cases": cases,
        "mr_cases": mr_cases,
        "case_seed": R.AOVA_SEED + seed,
        "indices": [R.NORMATIVE_INDEX, R.NORMATIVE_INDEX + R.NORMATIVE_MR_OFFSET],
        "samples": {k: len(v) for k, v in sorted(samples.items())},
        **({"organs": sorted(organs)} if organs is not None else {}),
        **({"members": params.members, "member_index_offset": R.NORMATIVE_MEMBER_OFFSET} if params.members > 1 else {}),
        **(
            {
                "calibration_cases": calibration_cases,
                "calibration_samples": {k: len(v) for k, v in sorted(calibration.items())},
            }
            if calibration is not None
            else {}
        ),
        **({"anomaly_samples": {k: len(v) for k, v in sorted(anomalies.items())}} if anomalies is not None else {}),
        **({"halo_samples": {k: len(v) for k, v in sorted(halo.items())}} if halo else {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    # A partial refit (``organs``) keeps the record of the fit whose other organs it keeps; a
    # whole one replaces that record and every partial refit's.
    entry = {NORMATIVE: (normative.entry(), normative.state_dict())}
    if organs is not None:
        refits = [*pkg.manifest.get("provenance", {}).get("normative_refits", []), report]
        return add_networks(pkg, entry, out=out, provenance={"normative_refits": refits})
    return add_networks(
        pkg, entry, out=out, provenance={"normative_training": report}, drop_provenance=("normative_refits",)
    )


def _ends(curve: list[float], n: int = 20) -> list[float]:
    return [round(float(np.mean(curve[:n])), 5), round(float(np.mean(curve[-n:])), 5)] if curve else []


class _ExampleMaker:
    """Refinement examples of phantom cases of the refinement seed range, made as inference
    makes its inputs (the package's AOVA head, fusion and synthesis), for the refinement head
    and the lesion verifier."""

    def __init__(
        self,
        pkg: ModelPackage,
        seed: int,
        synthesis_steps: int,
        phantom_shape=None,
        device: str | None = None,
        normative=None,
        synthesize: bool = True,
    ):
        from diffugts.config import SynthesisParams
        from diffugts.networks.aova import AOVAHead
        from diffugts.networks.loading import load_head
        from diffugts.networks.refine import LEGACY_TARGET_CHANNELS, TARGET_CHANNELS
        from diffugts.stages.attend import default_threshold, fusion_of

        self.prep = Preprocessing.from_dict(pkg.manifest["preprocessing"])
        self.backbone = load_backbone(pkg, device or "cpu")
        self.aova = load_head(pkg, AOVA_HEAD, AOVAHead)
        self.features = pkg.network(AOVA_HEAD)["features"]
        self.fusion = fusion_of(pkg)
        self.organ_net = load_organ_net(pkg)
        self.threshold = default_threshold(pkg)
        self.channels = TARGET_CHANNELS if self.fusion else LEGACY_TARGET_CHANNELS
        self.text = TextEncoder()
        self.params = SynthesisParams(steps=synthesis_steps)
        self.rng = np.random.default_rng(seed)
        self.case_seed, self.shape = R.REFINE_SEED + seed, phantom_shape
        self.normative = normative  # the examples carry its candidates (for the lesion verifier)
        self.synthesize = synthesize  # False: no synthesis (diffugts.train.refine.refinement_example)

    def __call__(self, index: int, healthy: bool):
        return self.examples(self.case(index, healthy))

    def case(self, index: int, healthy: bool, modality: str = "CT"):
        """A seen-type (or lesion-free) phantom of the refinement seed range."""
        return phantom_case(
            self.case_seed,
            index,
            self.prep,
            split="seen",
            healthy=healthy,
            healthy_fraction=0.0,
            keep_volume=True,
            shape=self.shape,
            modality=modality,
        )

    def examples(self, case):
        """The examples of any case on the model grid with its volume (a dataset case too)."""
        from diffugts.train.refine import refinement_example

        return refinement_example(
            case,
            self.backbone,
            self.aova,
            self.text,
            self.features,
            self.prep,
            self.params,
            self.rng,
            self.fusion,
            self.threshold,
            self.channels,
            organ_net=self.organ_net,
            normative=self.normative,
            synthesize=self.synthesize,
        )


def train_refine_head(
    model: str | Path,
    out: Path | None = None,
    seed: int = 0,
    cases: int = 40,
    steps: int = 1200,
    synthesis_steps: int = 10,
    show_progress: bool = True,
    phantom_shape=None,
    healthy_cases: int = 0,
    source=None,
    checkpoint=None,
    device: str | None = None,
) -> ModelPackage:
    """``healthy_cases``: lesion-free cases whose coarse candidates are all false (with a fused
    coarse map the head also takes each target's deviation and organ channels). ``source``,
    ``checkpoint``, ``device``: as :func:`train_aova_head`."""
    from diffugts.train.refine import (
        Example,
        calibrate_threshold,
        evaluate_refine,
        held_out_probabilities,
        train_refine,
    )

    pkg = open_package(model)
    make = _ExampleMaker(pkg, seed, synthesis_steps, phantom_shape, device)
    examples: list[Example] = []
    held_out: list[Example] = []
    plan = [(i, False) for i in range(cases + (4 if cases or not source else 0))] + [
        (R.HEALTHY_INDEX + i, True) for i in range(healthy_cases + (2 if healthy_cases else 0))
    ]
    for i, healthy in progress(plan, desc="synthesis for refinement", unit="case", enable=show_progress):
        train = (i < cases) if not healthy else (i - R.HEALTHY_INDEX < healthy_cases)
        (examples if train else held_out).extend(make(i, healthy))
    # Dataset cases: one training case in five (the second, seventh, ...) validates the threshold
    # instead of training the head; the held-out cases are not used here: `evaluate --protocol`
    # scores them as the "seen" figures, so nothing may be tuned on them.
    threshold_cases = []
    for n, case in enumerate(source.training_cases(make.prep, keep_volume=True) if source else ()):
        (held_out if n % 5 == 1 else examples).extend(make.examples(case))
        threshold_cases += [case.case_id] if n % 5 == 1 else []
    t0 = time.perf_counter()
    head, history = train_refine(examples, steps, seed, show_progress=show_progress, checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    # The head's threshold, chosen on the held-out training cases (never evaluation seeds).
    probs = held_out_probabilities(head, held_out)
    # Dataset cases bring lesion-free organs of their own (false candidates) to calibrate on.
    cut = calibrate_threshold(probs, held_out) if (healthy_cases or source) and held_out else 0.5
    val = evaluate_refine(head, held_out, cut, probs)
    entry = {"config": head.config, "threshold": cut, "target_channels": list(make.channels)}
    return add_networks(
        pkg,
        {REFINE_HEAD: (entry, head.state_dict())},
        out=out,
        provenance={
            "refine_training": {
                "command": command_line(),
                "seed": seed,
                "cases": cases,
                "healthy_cases": healthy_cases,
                "examples": len(examples),
                "false_candidate_examples": sum(not e.truth.any() for e in examples),
                "case_seed": make.case_seed,
                "steps": steps,
                "synthesis_steps": synthesis_steps,
                "loss_first_last": _ends([h["loss"] for h in history]),
                "seconds": round(seconds, 1),
                "held_out_seen_dice": round(val["dice"], 4),
                "held_out_false_voxels_per_negative": round(val["false_voxels_per_negative"], 1),
                **({"datasets": source.provenance(), "threshold_cases": threshold_cases} if source else {}),
            }
        },
    )


def verifier_plan(
    cases: int, healthy_cases: int, mr_healthy_cases: int = 0, anomaly_cases: int = 0, anomaly_mr_cases: int = 0
) -> list[tuple[int, str, str]]:
    """The lesion verifier's fitting cases, in the order they are made: (index in the
    refinement seed range, kind, modality); kinds "seen" (seen lesion types), "healthy"
    (lesion-free), "anomalies" (lesion-free with generic anomalies painted)."""
    return (
        [(R.VERIFY_INDEX + i, "seen", "CT") for i in range(cases)]
        + [(R.VERIFY_HEALTHY_INDEX + i, "healthy", "CT") for i in range(healthy_cases)]
        + [(R.VERIFY_HEALTHY_INDEX + R.VERIFY_MR_OFFSET + i, "healthy", "MR") for i in range(mr_healthy_cases)]
        + [(R.VERIFY_ANOMALY_INDEX + i, "anomalies", "CT") for i in range(anomaly_cases)]
        + [(R.VERIFY_ANOMALY_INDEX + R.VERIFY_MR_OFFSET + i, "anomalies", "MR") for i in range(anomaly_mr_cases)]
    )


def verifier_examples(make: _ExampleMaker, seed: int, plan, show_progress: bool = True):
    """Per case of ``plan`` (:func:`verifier_plan`) its examples, made in order by ``make``
    (anomalies painted from the verifier's own stream of ``seed``): a generator of (plan
    entry, examples)."""
    from diffugts.train.anomalies import with_relative_anomalies

    painter = np.random.default_rng([seed, R.VERIFY_ANOMALY_STREAM])
    desc = "synthesis for verification" if make.synthesize else "candidates for verification"
    for entry in progress(plan, desc=desc, unit="case", enable=show_progress):
        i, kind, modality = entry
        case = make.case(i, kind != "seen", modality)
        if kind == "anomalies":
            case = with_relative_anomalies(case, make.prep, painter)
        yield entry, make.examples(case)


def lookalike_atlas(make: _ExampleMaker, cases: int, show_progress: bool = True) -> dict:
    """The look-alike atlas (diffugts.stages.lookalikes) of ``cases`` lesion-free CT and as many
    MR phantoms of the refinement seed range, none a fitting case: per organ and modality,
    every normative candidate's place in its organ, prompted for every organ as `evaluate`
    prompts a lesion-free study."""
    from collections import defaultdict

    from diffugts.stages.lookalikes import atlas_entry

    spacing = tuple(make.prep.spacing_mm)[::-1]
    voxel_ml = float(np.prod(make.prep.spacing_mm)) / 1000
    found: dict[str, list[np.ndarray]] = defaultdict(list)
    studies: dict[str, int] = defaultdict(int)
    plan = [
        (R.VERIFY_LOOKALIKE_INDEX + (R.VERIFY_MR_OFFSET if modality == "MR" else 0) + i, modality)
        for modality in ("CT", "MR")
        for i in range(cases)
    ]
    synthesize, make.synthesize = make.synthesize, False  # the candidates do not read the pseudo-healthy image
    try:
        for index, modality in progress(plan, desc="look-alike atlas", unit="case", enable=show_progress):
            _atlas_case(make, make.case(index, True, modality), spacing, voxel_ml, found, studies)
    finally:
        make.synthesize = synthesize
    return atlas_entry(found, studies)


def _atlas_case(make: _ExampleMaker, case, spacing, voxel_ml: float, found: dict, studies: dict) -> None:
    """One lesion-free case's look-alikes, added to ``found`` and ``studies`` (:func:`lookalike_atlas`)."""
    from diffugts.stages.lesions import DEFAULT_MIN_VOLUME_ML
    from diffugts.stages.lookalikes import places
    from diffugts.stages.verification import candidates
    from diffugts.train.verify import example_evidence

    for ex in make.examples(case):
        if ex.findings is None or ex.findings.key is None:
            continue  # an organ the normative model does not score, or one not found
        studies[ex.findings.key] += 1
        evidence = example_evidence(ex, np.zeros(ex.truth.shape, np.float32), spacing)
        labels, ids, _ = candidates(ex.normative, evidence, voxel_ml, DEFAULT_MIN_VOLUME_ML, ("log_volume_ml",))
        found[ex.findings.key].append(places(labels, ids, np.asarray(evidence.organ) > 0.5))


def train_lesion_verifier(
    model: str | Path,
    out: Path | None = None,
    seed: int = 0,
    cases: int = 12,
    healthy_cases: int = 6,
    synthesis_steps: int = 10,
    show_progress: bool = True,
    phantom_shape=None,
    candidate_source: str = "refined",
    deviation_k: float = 2.0,
    features: tuple[str, ...] | None = None,
    mr_healthy_cases: int = 0,
    min_recall: float | None = None,
    anomaly_cases: int = 0,
    anomaly_mr_cases: int = 0,
    grow_mm=KEEP,
    lookalike_cases: int = 0,
) -> ModelPackage:
    """The lesion verifier of a package with a fused coarse map and a refinement head, fitted
    on ``cases`` seen-type and ``healthy_cases`` lesion-free phantoms the head never saw, and
    ``mr_healthy_cases`` lesion-free MR phantoms (false candidates only: no lesion type, seen
    or unseen, and no MR lesion shapes it) (diffugts.train.verify); stored as
    ``networks.refine.verifier``. ``candidate_source``: "refined" (components of the head's
    mask), "deviation" (of |z| > ``deviation_k``) or "normative" (the package's normative
    model's candidates); ``features``: the component features it weighs (None: the original
    seven, diffugts.stages.verification.FEATURES); ``min_recall``: the least share of the
    fitting cases' true candidates its threshold keeps (diffugts.train.verify.fit_verifier).
    ``anomaly_cases`` / ``anomaly_mr_cases``: lesion-free CT / MR phantoms with generic
    anomalies painted into their organs (diffugts.train.anomalies.with_relative_anomalies), whose
    candidates on the anomalies count as lesions: true candidates of no lesion type, in every
    organ and both modalities, beside the seen types of CT liver and kidney. ``grow_mm``: how
    far the normative candidates grow from their seeds (NormativeParams.grow_mm, None:
    unlimited), set in the package's normative model (nothing of it refitted) and fitted on,
    since the verifier judges candidates as they grow; KEEP: as the package has it.
    ``lookalike_cases``: lesion-free CT and as many MR phantoms whose normative candidates make
    the look-alike atlas that the ``lookalikes`` feature reads (:func:`lookalike_atlas`)."""
    from dataclasses import replace

    from diffugts.networks.loading import load_head
    from diffugts.networks.refine import RefineHead
    from diffugts.stages.lesions import DEFAULT_MIN_VOLUME_ML
    from diffugts.stages.refine import refine_threshold
    from diffugts.stages.verification import FEATURES, NORMATIVE_ONLY
    from diffugts.train.refine import held_out_probabilities
    from diffugts.train.verify import component_samples, fit_verifier

    asked = sorted(set(features or ()) & set(NORMATIVE_ONLY))
    if asked and candidate_source != "normative":
        raise ConfigError(
            f"the verifier features {', '.join(asked)} weigh normative candidates only, not {candidate_source!r}"
        )
    if "lookalikes" in (features or ()) and lookalike_cases <= 0:
        raise ConfigError("the lookalikes feature needs a look-alike atlas: give --lookalike-cases N (N > 0)")
    if lookalike_cases and "lookalikes" not in (features or ()):
        raise ConfigError("--lookalike-cases makes an atlas only the lookalikes feature reads: add it to --features")
    if grow_mm is not KEEP and candidate_source != "normative":
        raise ConfigError(f"--grow-mm sets how normative candidates grow, not {candidate_source!r} ones")
    pkg = open_package(model)
    if "deviation" not in (pkg.network(REFINE_HEAD) or {}).get("target_channels", []):
        raise ConfigError(
            f"{pkg.root}: the lesion verifier needs a refinement head that takes the organ-relative "
            "deviation (train the AOVA head with a fusion, then `diffugts train refine`)"
        )
    normative = None
    if candidate_source == "normative":
        normative = normative_of(pkg)
        if normative is None:
            raise ConfigError(f"{pkg.root}: normative candidates need a normative model (`diffugts train normative`)")
        if grow_mm is not KEEP:
            try:
                normative.params = replace(normative.params, grow_mm=grow_mm)
            except ValueError as e:
                raise ConfigError(f"{pkg.root}: {e}") from None
    make = _ExampleMaker(pkg, seed, synthesis_steps, phantom_shape, normative=normative)
    head, cut = load_head(pkg, REFINE_HEAD, RefineHead), refine_threshold(pkg)
    features = tuple(features or FEATURES)
    plan = verifier_plan(cases, healthy_cases, mr_healthy_cases, anomaly_cases, anomaly_mr_cases)
    atlas = lookalike_atlas(make, lookalike_cases, show_progress) if lookalike_cases else None
    examples = [ex for _, exs in verifier_examples(make, seed, plan, show_progress) for ex in exs]
    probs = held_out_probabilities(head, examples)
    voxel_ml = float(np.prod(make.prep.spacing_mm)) / 1000
    samples = component_samples(
        examples,
        probs,
        cut,
        voxel_ml,
        DEFAULT_MIN_VOLUME_ML,
        candidate_source,
        deviation_k,
        features,
        tuple(make.prep.spacing_mm)[::-1],
        atlas,
    )
    lesion = sum(s["lesion"] for s in samples)
    entry = {k: v for k, v in pkg.network(REFINE_HEAD).items() if k != "verifier"}
    if 0 < lesion < len(samples):
        truth = sum(int(e.truth.sum()) for e in examples)
        verifier, report = fit_verifier(samples, truth, candidate_source, deviation_k, features, min_recall)
        entry["verifier"] = replace(verifier, lookalikes=atlas).as_dict() if atlas else verifier.as_dict()
    else:  # nothing to tell apart: the package keeps every refined lesion, and says why
        report = {
            "components": len(samples),
            "lesion_components": lesion,
            "not_fitted": f"the {candidate_source} candidates of the fitting cases hold no true and false lesions "
            "to tell apart",
        }
        log.warning(
            "%s: lesion verifier not fitted (%d components, %d of them lesions)", pkg.root, len(samples), lesion
        )
    networks = {REFINE_HEAD: (entry, pkg.state_dict(REFINE_HEAD))}
    if normative is not None and grow_mm is not KEEP:
        networks[NORMATIVE] = (normative.entry(), normative.state_dict())
    # The record of the verifier this one replaces joins the history, oldest first: how a shipped
    # package came to be stays in its manifest (a --grow-mm refit also changed its candidates).
    earlier = pkg.manifest.get("provenance", {})
    history = [
        *earlier.get("verifier_history", []),
        *([earlier["verifier_training"]] if "verifier_training" in earlier else []),
    ]
    return add_networks(
        pkg,
        networks,
        out=out,
        provenance={
            **({"verifier_history": history} if history else {}),
            "verifier_training": {
                "command": command_line(),
                "seed": seed,
                "cases": cases,
                "healthy_cases": healthy_cases,
                "mr_healthy_cases": mr_healthy_cases,
                "anomaly_cases": anomaly_cases,
                "anomaly_mr_cases": anomaly_mr_cases,
                **({"lookalike_cases": lookalike_cases} if lookalike_cases else {}),
                "case_seed": make.case_seed,
                "indices": [
                    R.VERIFY_INDEX,
                    R.VERIFY_HEALTHY_INDEX,
                    R.VERIFY_HEALTHY_INDEX + R.VERIFY_MR_OFFSET,
                    R.VERIFY_ANOMALY_INDEX,
                    R.VERIFY_ANOMALY_INDEX + R.VERIFY_MR_OFFSET,
                    *(
                        [R.VERIFY_LOOKALIKE_INDEX, R.VERIFY_LOOKALIKE_INDEX + R.VERIFY_MR_OFFSET]
                        if lookalike_cases
                        else []
                    ),
                ],
                "candidate_source": candidate_source,
                **({"grow_mm": grow_mm} if grow_mm is not KEEP else {}),
                "features": list(features),
                **({"deviation_k": deviation_k} if candidate_source == "deviation" else {}),
                **report,
            },
        },
    )


def train_demo(
    out: Path, recipe: R.DemoRecipe, show_progress: bool = True, backbone: str | Path | None = None
) -> ModelPackage:
    """The whole demo model of the recipe's configuration (``demo``: 3D, ``demo-2d``: the
    diffusers family): backbone, organ network, AOVA head, normative model, then the
    refinement head and its lesion verifier.
    ``backbone``: a package whose trained backbone is reused (heads only; the backbone's own
    provenance is kept, and the manifest says where it came from)."""
    clock = time.perf_counter()
    shape = recipe.phantom_shape
    if backbone is not None:
        source = open_package(backbone)
        if source.manifest["backbone"].get("config") != recipe.config:
            raise ConfigError(f"{source.root}: its backbone is not of the {recipe.config!r} configuration")
        # The source's verifier records describe a verifier the new heads replace from scratch:
        # they would otherwise linger, and the new verifier would list them as its history.
        add_networks(
            source,
            {},
            out=out,
            provenance={"backbone_from": {"package": source.name, "sha256": source.sha256}},
            drop_provenance=("verifier_training", "verifier_history"),
        )
    else:
        train_backbone(
            out,
            recipe.config,
            recipe.seed,
            recipe.backbone_cases,
            recipe.vae_steps,
            recipe.denoiser_steps,
            show_progress,
            phantom_shape=shape,
        )
    if recipe.organ_steps:
        train_organ_net(
            out,
            None,
            recipe.seed,
            recipe.aova_cases,
            recipe.organ_steps,
            recipe.organ_mr_healthy_cases,
            show_progress,
            phantom_shape=shape,
            refit_fusion=False,  # the AOVA head and its fusion are trained next
            claim_anatomy=recipe.organ_claim_anatomy,
            anomaly_p=recipe.organ_anomaly_p,
        )
    # features None: the backbone's own default scales (R.default_features).
    train_aova_head(
        out,
        None,
        recipe.seed,
        recipe.aova_cases,
        recipe.aova_steps,
        recipe.aova_dim,
        recipe.features,
        show_progress,
        phantom_shape=shape,
        synthetic_cases=recipe.aova_synthetic_cases,
        randomised_cases=recipe.aova_randomised_cases,
        mr_healthy_cases=recipe.aova_mr_healthy_cases,
        fusion_recall=recipe.fusion_recall,
        fusion_margin_mm=recipe.fusion_margin_mm,
    )
    if recipe.organ_steps and (recipe.normative_cases or recipe.normative_mr_cases):
        train_normative(
            out,
            None,
            recipe.seed,
            recipe.normative_cases,
            recipe.normative_mr_cases,
            show_progress,
            phantom_shape=shape,
            params=recipe.normative_params(),
            calibration_cases=recipe.normative_calibration_cases,
        )
    pkg = train_refine_head(
        out,
        None,
        recipe.seed,
        recipe.refine_cases,
        recipe.refine_steps,
        show_progress=show_progress,
        phantom_shape=shape,
        healthy_cases=recipe.refine_healthy_cases,
    )
    if recipe.verifier_cases:
        pkg = train_lesion_verifier(
            out, None, recipe.seed, show_progress=show_progress, phantom_shape=shape, **recipe.verifier_options()
        )
    manifest_provenance = {
        "recipe": recipe.as_dict(),
        "command": command_line(),
        "total_seconds": round(time.perf_counter() - clock, 1),
    }
    return add_networks(pkg, {}, provenance=manifest_provenance)
