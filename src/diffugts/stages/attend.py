"""Stage 2: anomaly-aware open-vocabulary attention maps for a study.

Study volume -> model grid -> frozen backbone features -> AOVA head, tiled with MONAI's
sliding-window inferer so large volumes never hold full-resolution features at once ->
per-prompt anomaly probability and coarse mask, mapped back onto the exact study grid.
Where the package's lesion verifier takes the normative model's candidates, the coarse mask
holds them too (synthesis inpaints them; see :func:`attention`).

``maps="training-free"`` replaces the trained head by the backbone's own cross-attention
maps (2D diffusers family only: :func:`~diffugts.networks.backbones.cross_attention.training_free_probabilities`,
abnormal vs normal prompts' attention mass); the artifact has the same layout, so synthesis
and refinement read it unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from diffugts.artifacts.attention import Attention
from diffugts.artifacts.study import Study, load_study
from diffugts.config import AOVA_HEAD, DEFAULT_COARSE_THRESHOLD, DEFAULT_SEED, AttentionParams, MapMode, MethodParams
from diffugts.errors import ConfigError, ParameterError
from diffugts.models.package import ModelPackage
from diffugts.networks.aova import AOVAHead, top_mean
from diffugts.networks.backbones import Backbone
from diffugts.networks.organs import OrganNet, grounded_region, organ_maps
from diffugts.networks.text import Target, TextEncoder, make_target
from diffugts.stages.deviation import Fusion, organ_deviation
from diffugts.stages.normative import target_candidates
from diffugts.stages.preprocess import ModelSpace, Preprocessing

log = logging.getLogger(__name__)
# Encoder levels of a whole-volume window are kept for refinement up to this size (the demo's
# are about 40 MB; a full-size CT is tiled, so nothing is kept and refinement encodes it).
ENCODER_CACHE_BYTES = 256 * 2**20
# Image-level score of a training-free map: the mean of its top 0.2 %, as the AOVA head's
# default top_fraction (a head's own affine calibration does not exist without training).
TRAINING_FREE_TOP_FRACTION = 0.002


@dataclass
class Method:
    """Everything a model package brings to the attention stage, loaded once."""

    package: ModelPackage
    backbone: Backbone
    head: AOVAHead | None  # None: loaded for training-free maps only
    text: TextEncoder
    prep: Preprocessing
    device: torch.device
    organs: OrganNet | None = None  # the package's organ grounding network, if it has one

    @property
    def roi_size(self) -> tuple[int, int, int] | None:
        roi = self.package.manifest.get("inference", {}).get("roi_size")
        return tuple(roi) if roi else None


def text_encoder_path(pkg: ModelPackage) -> Path | None:
    entry = pkg.manifest.get("text_encoder", {})
    return pkg.root / entry["path"] if entry.get("path") else None


def prompt_tensors(
    method: Method, targets: list[Target]
) -> tuple[torch.Tensor, list[tuple[list[int], list[int], list[int]]]]:
    """All prompts embedded once, and per target the indices of its generic normal, organ
    normal and abnormal prompts."""
    texts = list(dict.fromkeys(p for t in targets for p in t.prompts))
    groups = [t.groups(texts.index) for t in targets]
    return method.text.embed(texts).to(method.device), groups


@dataclass
class CoarseMaps:
    """The coarse stage's output for every target, on the model grid."""

    prob: np.ndarray  # (T, *grid) P(lesion of the target)
    score: np.ndarray  # (T,) image-level anomaly score
    organ: np.ndarray | None = None  # (T, *grid) bool: the target's organ with its inclusions
    z: np.ndarray | None = None  # (T, *grid) organ-relative deviation
    fused: bool = True  # the map is the fusion (else the head's own map; organ and z for reference)
    # The backbone's encoder levels of the whole volume, when one window covered it and they
    # are small enough to keep (ENCODER_CACHE_BYTES): refinement's E(x), not computed twice.
    encoder_levels: list | None = None


def fusion_of(pkg: ModelPackage):
    """The package's coarse-map fusion (diffugts.stages.deviation.Fusion), or None for heads trained
    before it existed (their map is the AOVA head's own probability)."""
    entry = pkg.network(AOVA_HEAD).get("fusion")
    return Fusion.from_dict(entry) if entry else None


def deviation_of(pkg: ModelPackage):
    """The organ-relative deviation's parameters (diffugts.stages.deviation.DeviationParams) that
    the package closes its organ maps with: its fusion's, or None (the defaults) for a package
    without an AOVA head or a fusion."""
    fusion = fusion_of(pkg) if pkg.has(AOVA_HEAD) else None
    return fusion.deviation if fusion else None


@torch.no_grad()
def coarse_maps(method: Method, x: np.ndarray, spacing, targets: list[Target], seed: int = 0) -> CoarseMaps:
    """The AOVA head tiled over the volume; with the package's fusion, its region and anomaly
    branches are fused with the organ-relative deviation (diffugts.stages.deviation)."""
    from monai.inferers import sliding_window_inference

    prompts, groups = prompt_tensors(method, targets)
    xt = torch.from_numpy(x)[None, None].to(method.device)
    index = method.backbone.feature_index(method.package.network(AOVA_HEAD)["features"])
    fusion = fusion_of(method.package)

    head = method.head
    if head is None:
        raise ConfigError("the AOVA maps need the package's trained head")
    kept: list = []
    n_encoder = sum(1 for s in method.backbone.feature_specs() if s.name.startswith("encoder"))

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=method.device).manual_seed(seed)
        feats = method.backbone.features(patch, spacing, generator=gen)
        if method.backbone.features_lead_with_encoder and patch.shape == xt.shape:
            levels = feats[:n_encoder]
            if sum(f.numel() * f.element_size() for f in levels) <= ENCODER_CACHE_BYTES:
                kept.extend(levels)
        out = head([feats[i] for i in index], prompts, groups, out_shape=tuple(patch.shape[2:]))
        return torch.cat([out.log_odds, out.region_log_odds, out.anomaly_log_odds], 1)

    roi = method.roi_size or tuple(x.shape)
    roi = tuple(min(r, s) for r, s in zip(roi, x.shape))
    maps = cast(
        torch.Tensor,
        sliding_window_inference(xt, roi, sw_batch_size=1, predictor=predictor, overlap=0.25, mode="gaussian"),
    )
    n = len(targets)
    # The organ and its deviation come with every head (the organ-aware baseline of `evaluate`
    # needs them); only a package with a fusion makes them its coarse map.
    spacing_kji = tuple(spacing)[::-1]
    grounding = organ_maps(method.organs, xt)

    def region(t: int) -> np.ndarray:
        return grounded_region(targets[t].organ, maps[0, n + t].float().cpu().numpy(), grounding)

    if fusion is None:
        devs = [organ_deviation(x, region(t), spacing_kji) for t in range(n)]
        organ, z = np.stack([d[0] for d in devs]), np.stack([d[2] for d in devs])
        a, b = head.score_affine
        score = torch.sigmoid(a * top_mean(maps[:, :n], head.top_fraction) + b)
        return CoarseMaps(
            torch.sigmoid(maps[0, :n]).float().cpu().numpy(),
            score[0].float().cpu().numpy(),
            organ,
            z,
            fused=False,
            encoder_levels=kept or None,
        )
    fused = [fusion.maps(x, region(t), maps[0, 2 * n + t].float().cpu().numpy(), spacing_kji) for t in range(n)]
    organ, z = np.stack([f.organ for f in fused]), np.stack([f.z for f in fused])
    prob = np.stack([f.prob for f in fused])
    fused_score = top_mean(torch.from_numpy(prob)[None], head.top_fraction)[0].numpy()
    return CoarseMaps(prob, fused_score, organ, z, encoder_levels=kept or None)


def attention_maps(
    method: Method, x: np.ndarray, spacing, targets: list[Target], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly probability (T, *grid) on the model grid and image-level scores (T,)."""
    maps = coarse_maps(method, x, spacing, targets, seed)
    return maps.prob, maps.score


@torch.no_grad()
def training_free_maps(
    method: Method, x: np.ndarray, targets: list[Target], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Training-free anomaly probability (T, *grid) from the backbone's cross-attention, and
    image-level scores (T,): the mean of each map's top :data:`TRAINING_FREE_TOP_FRACTION`.

    Tiled like :func:`attention_maps` (same ROI and blending), so memory behaves alike."""
    from monai.inferers import sliding_window_inference

    from diffugts.networks.backbones.cross_attention import training_free_probabilities

    check_training_free(method)
    xt = torch.from_numpy(x)[None, None].to(method.device)
    roi = tuple(min(r, s) for r, s in zip(method.roi_size or tuple(x.shape), x.shape))

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        return training_free_probabilities(method.backbone, patch, targets, seed=seed)  # type: ignore[arg-type]

    prob = cast(
        torch.Tensor,
        sliding_window_inference(xt, roi, sw_batch_size=1, predictor=predictor, overlap=0.25, mode="gaussian"),
    )
    score = top_mean(prob, TRAINING_FREE_TOP_FRACTION)
    return prob[0].float().cpu().numpy(), score[0].float().cpu().numpy()


def check_prompts(prompts) -> None:
    """A run needs at least one prompt (checked before any study is read)."""
    if not prompts:
        raise ParameterError("give at least one of {prompts}", "prompts")


def check_training_free(method: Method) -> None:
    if method.backbone.family != "diffusers2d":
        raise ParameterError(
            f"{method.package.root}: training-free maps need a backbone with text cross-attention "
            f"(the diffusers2d family); this model is {method.backbone.family!r}: use {{maps}} aova",
            "maps",
        )


def default_threshold(pkg: ModelPackage, maps: str = MapMode.AOVA) -> float:
    """The coarse-mask threshold: the AOVA entry's, or for training-free maps the backbone's
    ``attention.threshold`` (both default :data:`~diffugts.config.DEFAULT_COARSE_THRESHOLD`)."""
    if maps == MapMode.AOVA:
        return float(pkg.network(AOVA_HEAD).get("threshold", DEFAULT_COARSE_THRESHOLD))
    attention = pkg.manifest["backbone"].get("attention") or {}
    return float(attention.get("threshold", DEFAULT_COARSE_THRESHOLD))


def attention(
    method: Method, study: Study, x: np.ndarray, space: ModelSpace, prompts, params: AttentionParams
) -> Attention:
    """The attention artifact in memory: per prompt (text or :class:`Target`) its coarse map
    and mask and, for fused maps, its organ with inclusions, on the study grid. ``x`` /
    ``space``: the study on the model grid (diffugts.core.PreparedStudy)."""
    check_prompts(prompts)
    maps = params.maps
    if maps == MapMode.TRAINING_FREE:
        check_training_free(method)  # before any work
    elif method.head is None:
        raise ConfigError("the AOVA maps need the package's trained head")
    threshold = default_threshold(method.package, maps) if params.threshold is None else params.threshold
    targets = [p if isinstance(p, Target) else make_target(p) for p in prompts]
    t0 = time.perf_counter()
    coarse = None
    organs = None
    if maps == MapMode.AOVA:
        coarse = coarse_maps(method, x, tuple(method.prep.spacing_mm), targets, seed=params.seed)
        probs, scores = coarse.prob, coarse.score
        organs = coarse.organ if coarse.fused else None  # written only where refinement reads it
    else:
        probs, scores = training_free_maps(method, x, targets, seed=params.seed)
    voxel_ml = float(np.prod(study.geometry.spacing)) / 1000.0
    out = Attention({}, coarse=coarse)
    entries = []
    for n, (target, prob, score) in enumerate(zip(targets, probs, scores)):
        on_study = np.clip(space.to_study(prob), 0.0, 1.0).astype(np.float32)
        out.maps.append(on_study)
        out.masks.append(on_study >= threshold)
        out.organs.append(None if organs is None else space.to_study(organs[n].astype(np.float32), nearest=True) > 0.5)
        entries.append(
            {
                "index": n,
                "prompt": target.as_dict(),
                "score": round(float(score), 4),
                "threshold": threshold,
                "max_probability": round(float(on_study.max()), 4),
            }
        )
    # The normative model's candidates join the coarse masks, so that synthesis gives each a
    # pseudo-healthy image: the difference map covers every lesion refinement can report, and
    # a verifier that weighs |x - H| reads a real residual (H = x where nothing is inpainted).
    found = None
    if organs is not None:  # fused maps: the organ the candidates lie in
        names = [t.organ for t in targets]
        found = target_candidates(method.package, method.organs, x, space, study.modality, names, out.organs)
    out.normative = found
    for n, entry in enumerate(entries):
        if found is not None and found[n].candidates.any():
            extra = space.to_study(found[n].candidates.astype(np.float32), nearest=True) > 0.5
            entry["normative_volume_ml"] = round(float(extra.sum()) * voxel_ml, 3)
            out.masks[n] = out.masks[n] | extra
        entry["coarse_volume_ml"] = round(float(out.masks[n].sum()) * voxel_ml, 3)
    timings = {"attention_s": round(time.perf_counter() - t0, 3)}
    out.summary = {
        "stage": "attend",
        "model": {"name": method.package.name, "sha256": method.package.sha256},
        "maps": str(maps),
        "device": str(method.device),
        "targets": entries,
        "timings": timings,
    }
    return out


def attend(
    study_dir,
    model: str,
    prompts: list[str],
    out_dir,
    *,
    threshold: float | None = None,
    device: str | None = None,
    seed: int = DEFAULT_SEED,
    maps: str = MapMode.AOVA,
) -> dict:
    """The attention stage on files: per-prompt maps and coarse masks on the study grid, and
    ``attention.json`` last (diffugts.artifacts.attention); returns the summary.

    ``maps``: ``"aova"`` (the package's trained head) or ``"training-free"`` (the backbone's
    cross-attention maps; 2D diffusers packages, no head needed)."""
    from diffugts.artifacts import attention as artifact
    from diffugts.core import Core

    check_prompts(prompts)
    params = AttentionParams(maps=MapMode.parse(maps), threshold=threshold, seed=seed)
    study = load_study(study_dir)
    core = Core(model, device, MethodParams(attention=params))
    result = core.attend(core.prepare(study), prompts)
    return artifact.write(Path(out_dir), result, study.geometry)
