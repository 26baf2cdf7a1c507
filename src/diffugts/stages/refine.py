"""Stage 4: residual refinement.

Where the pseudo-healthy image differs from the input, something abnormal was there. The
pixel residual x - H, feature residuals |E(x) - E(H)| of the frozen encoder at each level,
and the coarse attention map go into a small trainable 3D U-Net (MONAI's BasicUNet) that
gives the refined probability. Post-processing keeps voxels inside the body and inside the
region synthesis could change, drops components below a minimum volume, and splits the rest
into lesion instances (diffugts.stages.lesions).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from diffugts.config import DEFAULT_MIN_VOLUME_ML, DEFAULT_REFINE_THRESHOLD, REFINE_HEAD
from diffugts.networks.backbones import Backbone
from diffugts.networks.refine import LEGACY_TARGET_CHANNELS, RefineHead

DEVIATION_SCALE = 4.0  # |z| / this: a lesion's deviation near unit scale
RESIDUAL_GAIN = 10.0  # residuals are a few % of the [0, 1] range; bring them near unit scale
# Voxels the head sees in one pass (windows x window size). Its activations take about 0.5 KB
# per voxel in fp32 (measured on the CPU), so a study with many findings on the 256 x 256 x 128
# model grid runs two targets per pass instead of all at once: bounded memory, same maps.
HEAD_BATCH_VOXELS = 2**24


@torch.no_grad()
def shared_inputs(
    backbone: Backbone,
    x: np.ndarray,
    h: np.ndarray,
    region: np.ndarray,
    as_tensor: bool = False,
    x_levels: list[torch.Tensor] | None = None,
) -> np.ndarray | torch.Tensor:
    """The target-independent channels on the model grid: (8, *S) float32.

    ``as_tensor`` keeps them on the backbone's device (no host round trip before the head).
    ``x_levels``: ``backbone.encoder_features(x)`` when already computed (consumed: changed
    in place).
    """
    device = next(backbone.parameters()).device
    xt = torch.from_numpy(x)[None, None].to(device)
    ht = torch.from_numpy(h)[None, None].to(device)
    channels = [xt, ht, (xt - ht) * RESIDUAL_GAIN, (xt - ht).abs() * RESIDUAL_GAIN]
    fx_levels = list(x_levels) if x_levels is not None else backbone.encoder_features(xt)
    fh_levels = backbone.encoder_features(ht)
    while fx_levels:  # level by level, in place, each freed once used: no full-size temporaries
        fx, fh = fx_levels.pop(0), fh_levels.pop(0)
        scale = fx.std() + 1e-6
        r = fx.sub_(fh).abs_().mean(1, keepdim=True) / scale
        del fx, fh
        channels.append(F.interpolate(r, size=x.shape, mode="trilinear", align_corners=False))
    channels.append(torch.from_numpy(region.astype(np.float32))[None, None].to(device))
    shared = torch.cat(channels, 1)[0].float()
    return shared if as_tensor else shared.cpu().numpy()


def target_inputs(
    channels,
    coarse: np.ndarray,
    organ: np.ndarray | None = None,
    x: np.ndarray | None = None,
    spacing_kji=None,
    params=None,
) -> np.ndarray:
    """One target's own input channels on the model grid, (C, *S), in the order ``channels``
    names them (a package's ``networks.refine.target_channels``)."""
    from diffugts.stages.deviation import DeviationParams, deviation_z

    out = []
    for name in channels:
        if name == "coarse":
            out.append(np.asarray(coarse, np.float32))
        elif name == "organ":
            out.append(np.asarray(organ, np.float32))
        elif name == "deviation":
            if x is None:
                raise ValueError("the deviation channel needs the volume x")
            z = deviation_z(x, np.asarray(organ, bool), spacing_kji, params or DeviationParams())
            out.append(np.abs(z).astype(np.float32) / DEVIATION_SCALE)
        else:
            raise ValueError(f"unknown refinement input channel {name!r}")
    return np.stack(out)


@torch.no_grad()
def refine_probability(
    head: RefineHead, shared: np.ndarray | torch.Tensor, coarse: np.ndarray, roi=None, bf16: bool = True
) -> np.ndarray:
    """Refined probability on the model grid (bf16 autocast on CUDA): one target's coarse map
    (*S) -> (*S), or several targets' coarse maps (T, *S) or own channels (T, C, *S) -> (T, *S),
    in batched passes of at most ``HEAD_BATCH_VOXELS`` (batch norm is fixed
    at inference, so a target's map does not depend on the others in its batch)."""
    from monai.inferers import sliding_window_inference

    device = next(head.parameters()).device
    shared = (shared if isinstance(shared, torch.Tensor) else torch.from_numpy(shared)).to(device)
    coarse = np.asarray(coarse, dtype=np.float32)
    single = coarse.ndim == shared.ndim - 1
    coarse = coarse[None] if single else coarse
    coarse = coarse[:, None] if coarse.ndim == shared.ndim else coarse  # (T, C, *S)
    roi = tuple(min(r, s) for r, s in zip(roi or shared.shape[1:], shared.shape[1:]))
    per_pass = max(1, HEAD_BATCH_VOXELS // math.prod(roi))  # windows per head call
    per_input = max(1, HEAD_BATCH_VOXELS // math.prod(shared.shape[1:]))  # targets per input tensor
    prob = np.empty((coarse.shape[0],) + coarse.shape[2:], np.float32)
    for start in range(0, len(coarse), per_input):
        own = torch.from_numpy(coarse[start : start + per_input]).to(device)
        inp = torch.cat([shared[None].expand(len(own), *shared.shape), own], 1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logits = cast(
                torch.Tensor,
                sliding_window_inference(
                    inp, roi, sw_batch_size=per_pass, predictor=head, overlap=0.25, mode="gaussian"
                ),
            )
        prob[start : start + len(own)] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    return prob[0] if single else prob


def refined_probabilities(
    head: RefineHead, shared, coarse: list[np.ndarray], allowed: list[np.ndarray], space, roi=None, own=None
) -> list[np.ndarray]:
    """Per target its refined probability on the study grid, inside the bounding box of its
    ``allowed`` region (0 elsewhere: nothing outside it becomes a mask), from its ``coarse``
    map (study grid), or from ``own(n, coarse_on_model_grid)``, the target's own channels
    (C, *S) on the model grid. Only targets with a region go through the head, in one batch."""
    from diffugts.stages.synthesize.masks import bbox

    probs = [np.zeros(a.shape, np.float32) for a in allowed]
    run = [n for n, a in enumerate(allowed) if a.any()]
    if run:
        inputs = [space.to_model(coarse[n]) for n in run]
        if own is not None:
            inputs = [own(n, c) for n, c in zip(run, inputs)]
        refined = refine_probability(head, shared, np.stack(inputs), roi)
        for n, prob in zip(run, refined):
            box = bbox(allowed[n])
            probs[n][box] = np.clip(space.to_study(prob, box=box), 0.0, 1.0)
    return probs


def refine_threshold(pkg) -> float:
    """The refined-probability threshold of the package's head (calibrated on held-out training
    cases by ``train refine``; 0.5 for heads made before)."""
    return float((pkg.network(REFINE_HEAD) or {}).get("threshold", DEFAULT_REFINE_THRESHOLD))


def own_channels(pkg, x: np.ndarray, space, organs: list[np.ndarray | None]):
    """For :func:`refined_probabilities`: ``own(n, coarse_model)`` giving target n's channels
    as the package's refine head expects them, or None for heads that take the coarse map
    alone. ``organs``: per target its organ mask on the study grid (the attention artifact's;
    None: no organ, so no deviation either). A target's channels are made once (the head and
    the lesion verifier both read them; its coarse map does not change in between)."""
    from diffugts.stages.attend import fusion_of

    channels = tuple((pkg.network(REFINE_HEAD) or {}).get("target_channels", LEGACY_TARGET_CHANNELS))
    if channels == LEGACY_TARGET_CHANNELS:
        return None
    fusion = fusion_of(pkg)
    params = fusion.deviation if fusion else None
    spacing = tuple(space.model.spacing)[::-1]
    made: dict[int, np.ndarray] = {}

    def own(n: int, coarse_model: np.ndarray) -> np.ndarray:
        if n not in made:
            organ = organs[n]
            organ = (
                space.to_model(organ.astype(np.float32), nearest=True) > 0.5
                if organ is not None
                else np.zeros(coarse_model.shape, bool)
            )
            made[n] = target_inputs(channels, coarse_model, organ, x, spacing, params)
        return made[n]

    return own


def verify_masks(
    pkg,
    masks: list[np.ndarray],
    probs: list[np.ndarray],
    coarse: list[np.ndarray],
    organs: list[np.ndarray | None],
    residual: np.ndarray | None,
    own,
    space,
    normative: list | None = None,
    threshold: float | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Each target's mask (study grid) without the lesions the package's lesion verifier
    rejects (diffugts.stages.verification); unchanged without a verifier. A verifier whose
    candidates are the deviation's or the normative model's components replaces the masks by
    its verified candidates (``normative``: per target the normative model's findings,
    diffugts.stages.normative.Findings, on the model grid), and then also gives per target
    each lesion's confidence, the verifier's score of its candidate, on the study grid (else
    None: the head's probability says how sure it is).
    ``residual``: |x - H| on the model grid (None: nothing was inpainted); ``own``: the
    :func:`own_channels` the head read, whose deviation channel is the |z| evidence;
    ``threshold``: the verifier's operating point instead of the package's (0..1)."""
    from diffugts.stages.lesions import voxel_ml
    from diffugts.stages.synthesize.masks import bbox, grow
    from diffugts.stages.verification import GEOMETRY, Evidence, verified, verifier_of

    verifier = verifier_of(pkg)
    none: list[np.ndarray | None] = [None] * len(masks)
    if verifier is None:
        return masks, none
    if threshold is not None:
        verifier = dataclasses.replace(verifier, threshold=float(threshold))
    deviation = list(pkg.network(REFINE_HEAD)["target_channels"]).index("deviation")
    if residual is None:
        residual = np.zeros(space.model.shape, np.float32)
    if verifier.candidate_source != "refined":
        return _verified_candidates(verifier, probs, coarse, organs, residual, own, deviation, space, normative)
    if not any(m.any() for m in masks):
        return masks, none
    out = []
    geometric = bool(set(verifier.features) & set(GEOMETRY))
    for n, mask in enumerate(masks):
        box = bbox(mask)
        if box is None:
            out.append(mask)
            continue
        if geometric and organs[n] is not None:  # depth is measured to the organ's surface, not a crop's edge
            box = grow(bbox(mask | organs[n]) or box, (1, 1, 1), mask.shape)
        z = own(n, space.to_model(coarse[n]))[deviation] * DEVIATION_SCALE
        organ_n = organs[n]
        organ = organ_n[box] if organ_n is not None else np.zeros(mask[box].shape, bool)
        evidence = Evidence(
            refined=probs[n][box],
            coarse=coarse[n][box],
            deviation=space.to_study(z, box=box),
            residual=space.to_study(residual, box=box),
            organ=organ,
            spacing_mm=tuple(space.study.spacing)[::-1],
        )
        kept = np.zeros_like(mask)
        kept[box] = verified(mask[box], evidence, verifier, voxel_ml(space.study))
        out.append(kept)
    return out, none


def _verified_candidates(
    verifier, probs, coarse, organs, residual, own, deviation: int, space, normative=None
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Each target's verified lesions (study grid) when its candidates are not the head's mask
    (the verifier's ``candidate_source``): cut and scored on the model grid, where the
    verifier was fitted, every map there; the kept lesions mapped back to the study grid, with
    their confidence (:func:`lesion_confidence`)."""
    from diffugts.stages.lesions import voxel_ml
    from diffugts.stages.lookalikes import lookalikes_for
    from diffugts.stages.normative import delineated
    from diffugts.stages.verification import Evidence, deviation_candidates, scored_verified

    out: list[np.ndarray] = []
    confidence: list[np.ndarray | None] = []
    for n, prob in enumerate(probs):
        coarse_model = space.to_model(coarse[n])
        z = own(n, coarse_model)[deviation] * DEVIATION_SCALE
        organ_n = organs[n]
        organ = (
            space.to_model(organ_n.astype(np.float32), nearest=True) > 0.5
            if organ_n is not None
            else np.zeros(z.shape, bool)
        )
        findings = normative[n] if normative is not None and verifier.candidate_source == "normative" else None
        evidence = Evidence(
            refined=space.to_model(prob),
            coarse=coarse_model,
            deviation=z,
            residual=residual,
            organ=organ,
            spacing_mm=tuple(space.model.spacing)[::-1],
            normative=findings.score if findings is not None else None,
            organ_log_odds=findings.log_odds if findings is not None else None,
            image=findings.image if findings is not None else None,
            lookalikes=lookalikes_for(verifier.lookalikes, findings.key)
            if findings is not None and verifier.lookalikes is not None
            else None,
        )
        if verifier.candidate_source == "normative":
            found = findings.candidates if findings is not None else np.zeros(z.shape, bool)
        else:
            found = deviation_candidates(z, verifier.deviation_k)
        kept, score = scored_verified(found, evidence, verifier, voxel_ml(space.model))
        if findings is not None and findings.delineation is not None:
            kept = delineated(kept, findings.delineation)  # verified as whole candidates, reported delineated
        elif findings is not None and findings.level_delineation is not None:
            kept = findings.level_delineation(kept, organ, findings.score, evidence.spacing_mm)
        out.append(space.to_study(kept.astype(np.float32)) >= 0.5)
        if kept.any():
            confidence.append(space.to_study(lesion_confidence(kept, cast(np.ndarray, score)), nearest=True))
        else:  # nothing kept: no lesion to read a confidence from
            confidence.append(np.zeros(space.study.shape, np.float32))
    return out, confidence


def lesion_confidence(lesions: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Each component of ``lesions`` (as reported: delineation may reach a little past its
    candidate) carries the largest verifier ``score`` it overlaps, on its voxels and one
    voxel around them, so that a lesion resampled onto the study grid (trilinear, cut at 0.5)
    finds its value under every voxel when this map is resampled by nearest neighbour. (Where
    lesions apart on this grid join on the study grid, the joined lesion's confidence, a mean
    over its voxels, is the voxel-weighted mean of theirs.)"""
    labels, n = ndimage.label(np.asarray(lesions, bool), structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(labels.shape, np.float32)
    value = np.concatenate([[0.0], ndimage.maximum(score, labels, np.arange(1, n + 1))]).astype(np.float32)
    return ndimage.grey_dilation(value[labels], size=(3, 3, 3))


def normative_candidates(core, study, attention) -> list | None:
    """Per target the normative model's findings on the model grid, inside the attention
    artifact's organ (diffugts.stages.normative.target_candidates): those the
    attention stage found, when it ran in this process, else computed again from the
    artifact's organs alike. ``core``: a :class:`diffugts.core.Core`; ``study``: its
    :class:`~diffugts.core.PreparedStudy`."""
    from diffugts.stages.normative import target_candidates, verifies_normative

    if attention.normative is not None:
        return attention.normative
    if not verifies_normative(core.package):
        return None  # before the model grid: it needs the backbone
    x, space = study.model_grid
    names = [(t.get("prompt") or {}).get("organ") for t in attention.targets]
    organs = [attention.organs[n] if n < len(attention.organs) else None for n in range(len(names))]
    return target_candidates(core.package, core.organ_net, x, space, study.study.modality, names, organs)


def target_region(coarse_mask: np.ndarray, geometry, dilation_mm: float) -> np.ndarray:
    """The target's own coarse mask grown exactly as synthesis grew it: a prompt's lesions
    must lie where its attention pointed (synthesis inpaints the union of every prompt's
    masks, so without this one prompt's lesion would be reported under every prompt)."""
    from diffugts.stages.synthesize.masks import make_region, spacing_kji

    return make_region(coarse_mask, spacing_kji(geometry), dilation_mm, 0.0).dilated


def body_mask(volume: np.ndarray, modality: str) -> np.ndarray:
    """The patient's body: the largest connected component above air, holes filled."""
    if modality == "CT":
        body = volume > -500
    else:
        body = volume > np.percentile(volume, 60) * 0.2
    labels, n = ndimage.label(body)
    if n == 0:
        return body
    sizes = ndimage.sum(body, labels, range(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(body)


def residual_only(x: np.ndarray, h: np.ndarray, region: np.ndarray, threshold: float) -> np.ndarray:
    """The "coarse + synthesis residual, no head" variant: |x - H| above a threshold."""
    return (np.abs(x - h) > threshold) & region


def refinement(core, study, attention, synthesis):
    """The lesion artifact in memory (diffugts.artifacts.lesions.Lesions): refined masks and
    lesion instances for every prompt of ``attention``. ``core``: a
    :class:`diffugts.core.Core`; ``study``: its :class:`~diffugts.core.PreparedStudy`; the
    backbone and head are used only where some target has a region to refine."""
    from diffugts.stages.lesions import lesion_artifact
    from diffugts.stages.preprocess import intensity_range

    s = study.study
    inpainted = synthesis.inpainted
    dilation_mm = synthesis.params.dilation_mm
    coarse, allowed, organs = [], [], []
    for n in range(len(attention.targets)):
        coarse.append(attention.maps[n])
        organs.append(attention.organs[n])
        own = target_region(coarse[-1] >= attention.threshold(n), s.geometry, dilation_mm)
        allowed.append(own & inpainted & study.body)
    # A target's lesions must lie in its allowed region, so a target without one needs no
    # head pass (its mask is empty whatever the head says), and a study where no target has
    # one (most of a cohort) needs no features either.
    probs = [np.zeros(s.geometry.shape, np.float32) for _ in allowed]
    pkg = core.package
    normative = normative_candidates(core, study, attention)
    shared = own_inputs = residual = None
    verify = any(a.any() for a in allowed) or any(f.candidates.any() for f in normative or ())
    if verify:  # else no network is loaded (most studies of a cohort)
        x, space = study.model_grid
        if inpainted.any():
            # H is normalised with the input's own range so x - H is a pure residual.
            lo, hi = intensity_range(s.volume, s.modality, core.prep)
            h = space.to_model(((synthesis.pseudo_healthy - lo) / (hi - lo)).astype(np.float32))
            if s.modality == "CT":
                h = np.clip(h, 0.0, 1.0)
            residual = np.abs(x - h)  # the verifier's evidence, also where no head runs (normative candidates)
    if any(a.any() for a in allowed):
        backbone, head = core.backbone, core.refine_head
        region_model = space.to_model(inpainted.astype(np.float32), nearest=True) > 0.5
        coarse_maps = attention.coarse  # the attention stage's encoder levels of x, when it kept them
        x_levels = coarse_maps.encoder_levels if coarse_maps is not None else None
        if coarse_maps is not None:
            coarse_maps.encoder_levels = None  # consumed here (changed in place)
        shared = shared_inputs(backbone, x, h, region_model, as_tensor=True, x_levels=x_levels)
        roi = (pkg.manifest.get("inference") or {}).get("roi_size")
        own_inputs = own_channels(pkg, x, space, organs)
        probs = refined_probabilities(head, shared, coarse, allowed, space, roi, own_inputs)
    cut = refine_threshold(pkg)
    masks = [(p >= cut) & a for p, a in zip(probs, allowed)]
    if verify:
        if own_inputs is None:  # no coarse region, normative candidates: the verifier still reads |z|
            own_inputs = own_channels(pkg, x, space, organs)
        operating_point = core.params.refine.verifier_threshold
        masks, confidence = verify_masks(
            pkg, masks, probs, coarse, organs, residual, own_inputs, space, normative, operating_point
        )
        probs = [p if c is None else c for p, c in zip(probs, confidence)]  # what each lesion's confidence reads
    targets = [{"prompt": e["prompt"], "score": e["score"]} for e in attention.targets]
    return lesion_artifact(
        s,
        targets,
        masks,
        probs,
        min_volume_ml=core.params.refine.min_volume_ml,
        model={"name": pkg.name, "sha256": pkg.sha256},
        verifier_threshold=core.params.refine.verifier_threshold,
    )


def timer():
    start = time.perf_counter()
    return lambda: round(time.perf_counter() - start, 3)


def refine(
    study_dir,
    attention_dir,
    synthesis_dir,
    model: str,
    out_dir,
    *,
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
    device: str | None = None,
    backbone: Backbone | None = None,
    head: RefineHead | None = None,
    verifier_threshold: float | None = None,
) -> dict:
    """The refinement stage on files: the lesion artifact (``lesions.json`` last) for every
    prompt of the attention artifact; returns its summary and the stage's time.
    ``verifier_threshold``: the lesion verifier's operating point (None: the package's)."""
    from diffugts.artifacts import attention as attention_artifact, lesions as artifact, synthesis as synthesis_artifact
    from diffugts.artifacts.study import load_study
    from diffugts.config import MethodParams, RefineParams
    from diffugts.core import Core

    elapsed = timer()
    study = load_study(study_dir)
    attention = attention_artifact.read(attention_dir, study.geometry, masks=False)
    synthesis = synthesis_artifact.read(synthesis_dir, study.geometry)
    params = MethodParams(refine=RefineParams(min_volume_ml, verifier_threshold))
    core = Core(model, device, params, backbone=backbone, refine_head=head)
    lesions = core.refine(core.prepare(study), attention, synthesis)
    summary = artifact.write(out_dir, lesions, study.geometry)
    return dict(summary, timings={"refine_s": elapsed()})
