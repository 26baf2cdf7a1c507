"""Stage 3: pseudo-healthy synthesis by latent inpainting (docs/synthesis.md).

Coarse mask (attention artifact or a NIfTI) -> dilated by ``dilation_mm`` on the study grid
-> model grid -> latent grid (any-voxel rule) -> only the latent bounding box plus
``context_mm`` is encoded, inpainted (:mod:`~diffugts.stages.synthesize.inpaint`) and decoded ->
back onto the study grid and pasted into the input with the feathered weights of
:func:`~diffugts.stages.synthesize.masks.make_region`: outside the dilated mask the output *is* the
input, bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from diffugts.config import SynthesisParams
from diffugts.errors import ParameterError
from diffugts.stages.preprocess import intensity_range
from diffugts.stages.synthesize.fidelity import GroundTruth, fidelity
from diffugts.stages.synthesize.inpaint import inpaint
from diffugts.stages.synthesize.masks import (
    MaskSource,
    Region,
    bbox,
    latent_box,
    latent_footprint,
    make_region,
    spacing_kji,
)

log = logging.getLogger(__name__)
BEYOND_BAND = 0.1  # share of the CT window next to its edges where a synthetic value counts as saturated
NOTHING = "empty mask: nothing to inpaint, the output equals the input"


def synthesize(
    study_dir,
    model: str,
    out_dir,
    *,
    mask=None,
    attention=None,
    target: int | None = None,
    params: SynthesisParams | None = None,
    ground_truth=None,
    device: str | None = None,
    show_progress: bool = True,
    backbone=None,
) -> dict:
    """Write the pseudo-healthy study to ``out_dir`` (``synthesis.json`` last); return the summary.

    Exactly one of ``mask`` (a binary NIfTI on the study grid) and ``attention`` (an attention
    artifact folder; the union of its coarse masks, or ``target`` alone) gives the region.
    ``ground_truth`` (a :class:`GroundTruth`, or a phantom case folder / case.json, read by
    :func:`diffugts.phantom.truth.load_phantom_truth`) adds the fidelity figures. ``backbone``
    skips loading the package's networks (tests, benchmarks).
    """
    from diffugts.artifacts import attention as attention_artifact, synthesis as artifact
    from diffugts.artifacts.files import read_binary
    from diffugts.artifacts.study import load_study
    from diffugts.config import MethodParams
    from diffugts.core import Core

    params = params or SynthesisParams()
    params.validate()
    if (mask is None) == (attention is None):
        raise ParameterError("give exactly one of {mask} and {attention}", "mask", "attention")
    clock = time.perf_counter()
    study = load_study(study_dir)
    if mask is not None:
        coarse, source = read_binary(mask, study.geometry, "mask"), MaskSource("file", str(mask), [])
    else:
        found = attention_artifact.read(attention, study.geometry, maps=False, organs=False)
        if target is not None and not 0 <= target < len(found.targets):
            raise ParameterError(
                f"{{target}} {target}: the attention artifact has targets 0..{len(found.targets) - 1}", "target"
            )
        coarse, used = found.union(target)
        source = MaskSource("attention", str(attention), used)
    # Nothing to inpaint: no weights are read, so none are verified either.
    core = Core(model, device, MethodParams(synthesis=params), verify=bool(coarse.any()), backbone=backbone)
    if ground_truth is not None and not isinstance(ground_truth, GroundTruth):
        from diffugts.phantom.truth import load_phantom_truth  # the phantom world, only for a case folder

        ground_truth = load_phantom_truth(ground_truth, study.geometry, study.volume)
    result = core.synthesize(
        core.prepare(study), coarse, source=source, ground_truth=ground_truth, show_progress=show_progress
    )
    result.summary["timings_s"]["load"] += time.perf_counter() - clock

    return artifact.write(Path(out_dir), result, study.volume, study.geometry)


def synthesis(
    core,
    study,
    region,
    *,
    source: MaskSource | None = None,
    ground_truth: GroundTruth | None = None,
    show_progress: bool = False,
):
    """The synthesis artifact in memory (diffugts.artifacts.synthesis.Synthesis): ``core`` a
    :class:`diffugts.core.Core` (its backbone is loaded only if there is something to
    inpaint), ``study`` a :class:`diffugts.core.PreparedStudy`, ``region`` an attention
    artifact (the union of its coarse masks) or a bool mask on the study grid."""
    from diffugts.artifacts import synthesis as artifact

    clock = time.perf_counter()
    params = core.params.synthesis
    if isinstance(region, np.ndarray):
        coarse = region.astype(bool, copy=False)
        source = source or MaskSource("array", "", [])
    else:
        coarse, used = region.union()
        source = source or MaskSource("attention", str(region.root or ""), used)
    s = study.study
    made = make_region(coarse, spacing_kji(s.geometry), params.dilation_mm, params.feather_mm)
    timings = {"load": time.perf_counter() - clock}
    if coarse.any():
        backbone = core.backbone
        tile = params.tile or (core.package.manifest.get("inference") or {}).get("roi_size")
        pseudo, inpainting = pseudo_healthy(
            s.volume,
            s.geometry,
            s.modality,
            made,
            backbone,
            core.prep,
            params,
            tile=tile,
            show_progress=show_progress,
            timings=timings,
            prepared=study.model_grid,
        )
        used_device = str(core.device)
    else:
        pseudo, used_device, inpainting = s.volume.astype(np.float32, copy=True), None, None
    summary = _summary(s, made, core.package, params, source, used_device, inpainting, ground_truth, pseudo)
    summary["timings_s"] = timings
    return artifact.Synthesis(summary, pseudo, made.dilated)


def pseudo_healthy(
    volume: np.ndarray,
    geometry,
    modality: str,
    region: Region,
    backbone,
    prep,
    params: SynthesisParams,
    tile=None,
    show_progress: bool = False,
    timings: dict | None = None,
    prepared=None,
) -> tuple[np.ndarray, dict]:
    """The pseudo-healthy volume on the volume's own grid, and what was done (in memory).
    ``prepared``: the volume's (x, space) on the model grid when already made."""
    import torch

    from diffugts.stages.preprocess import to_model

    timings = {} if timings is None else timings
    device = next(backbone.parameters()).device
    clock = time.perf_counter()
    x, space = prepared or to_model(volume, geometry, modality, prep, device=backbone.resample_device)
    stride = backbone.latent_stride
    footprint = latent_footprint(space.to_model(region.dilated.astype(np.float32)) > 0, stride)
    latent_mm = [s * stride for s in prep.spacing_mm[::-1]]
    mk, mj, mi = (int(math.ceil(params.context_mm / mm)) for mm in latent_mm)
    margin = (mk, mj, mi)
    multiple = max(prep.multiple // stride, 1)  # the model grid is padded to this many latent voxels
    lbox = latent_box(footprint, margin, multiple)
    ibox = tuple(slice(s.start * stride, s.stop * stride) for s in lbox)
    tile_latent = None
    if tile:
        tile_latent = tuple(
            max(multiple, int(t) // stride // multiple * multiple) for t in np.broadcast_to(np.asarray(tile), (3,))
        )
    timings["preprocess"] = time.perf_counter() - clock

    stats: dict = {}
    xt = torch.from_numpy(np.ascontiguousarray(x[ibox]))[None, None].to(device)
    mt = torch.from_numpy(np.ascontiguousarray(footprint[lbox]))[None, None].to(device)
    out = inpaint(
        backbone,
        xt,
        mt,
        tuple(prep.spacing_mm),
        strength=params.strength,
        steps=params.steps,
        jumps=params.jumps,
        seed=params.seed,
        tile=tile_latent,
        overlap=params.tile_overlap,
        show_progress=show_progress,
        stats=stats,
    )
    inpainted = out[0, 0].float().cpu().numpy()
    if modality == "CT":
        inpainted = np.clip(inpainted, 0.0, 1.0)  # the model's CT range is the clipped window
    for key in ("encode_s", "denoise_s", "decode_s"):
        timings[key.removesuffix("_s")] = stats[key]

    clock = time.perf_counter()
    full = x.copy()
    full[ibox] = inpainted
    lo, hi = intensity_range(volume, modality, prep)
    # Only the dilated mask's box of the study grid is pasted into: resample just that.
    sbox = bbox(region.dilated) or tuple(slice(0, n) for n in volume.shape)
    synthetic = space.to_study(full, box=sbox) * np.float32(hi - lo) + np.float32(lo)
    source = volume[sbox]
    # The model's CT range is a clipped window: where the synthetic image lies near an edge of
    # it (within BEYOND_BAND of the window) and the input lies beyond that same edge (lung,
    # gas, bone, metal), the model saw a saturated input and its value is unknown beyond the
    # window, so the input is kept there instead of being clamped to the window's edge (which
    # invented |x - H| of up to ~1000 HU). A synthetic value well inside the window (healthy
    # liver where a calcification was) still replaces the input.
    beyond = np.zeros(source.shape, bool)
    if modality == "CT":
        edge = np.float32(BEYOND_BAND * (hi - lo))
        beyond = ((synthetic <= lo + edge) & (source < lo)) | ((synthetic >= hi - edge) & (source > hi))
    # Harmonisation: the ring between the coarse mask and its dilation is regenerated too,
    # yet it is (mostly) healthy tissue in x, so x - H there measures the generator's
    # intensity bias for this tissue (a small denoiser tends to drift); the median removes
    # it without being pulled by a lesion that pokes into the ring.
    offset = 0.0
    ring = region.dilated[sbox] & ~region.mask[sbox] & ~beyond
    if params.harmonise and ring.sum() >= 20:
        offset = float(np.median(source[ring] - synthetic[ring]))
        synthetic += np.float32(offset)
    pseudo = volume.astype(np.float32, copy=True)
    view = pseudo[sbox]
    sel = (region.weight[sbox] > 0) & ~beyond
    w = region.weight[sbox][sel]
    view[sel] = w * synthetic[sel] + (1 - w) * view[sel]
    timings["paste"] = time.perf_counter() - clock
    return pseudo, {
        "latent_voxels": int(footprint.sum()),
        "crop_model_kji": [[s.start, s.stop] for s in ibox],
        "tile_latent": list(tile_latent) if tile_latent else None,
        "tiles": stats["tiles"],
        "denoiser_calls": stats["denoiser_calls"],
        "harmonise_offset": round(offset, 3),
        "kept_beyond_window_voxels": int((beyond & (region.weight[sbox] > 0)).sum()),
        "timesteps": [round(float(t), 3) for t in stats["timesteps"]],
    }


def _summary(
    study,
    region: Region,
    pkg,
    params: SynthesisParams,
    source: MaskSource,
    device: str | None,
    inpainting: dict | None,
    truth: GroundTruth | None,
    pseudo: np.ndarray,
) -> dict:
    from diffugts.artifacts.synthesis import FILES

    voxel_ml = float(np.prod(study.geometry.spacing)) / 1000.0
    summary = {
        "stage": "synthesize",
        "model": {"name": pkg.name, "sha256": pkg.sha256, "scheduler": pkg.manifest["backbone"]["scheduler"]["class"]},
        "device": device,
        "nothing_to_inpaint": inpainting is None,
        "parameters": asdict(params),
        "mask": {
            "source": source.kind,
            "path": source.path,
            "targets": source.targets,
            "coarse_voxels": int(region.mask.sum()),
            "coarse_ml": round(float(region.mask.sum()) * voxel_ml, 3),
            "dilated_voxels": int(region.dilated.sum()),
            "dilated_ml": round(float(region.dilated.sum()) * voxel_ml, 3),
        },
        "inpainting": inpainting,
        "paste_back": "outside inpaint_mask.nii.gz the output equals the input bit for bit; inside, "
        "output = w * synthetic + (1 - w) * input with w = 1 on the coarse mask, ramping "
        "from 0 to 1 over feather_mm inside the dilated mask's border",
        "units": "HU" if study.modality == "CT" else "input units",
        "files": dict(FILES),
    }
    if inpainting is None:
        summary["note"] = NOTHING
    if truth is not None:
        summary["fidelity"] = fidelity(study.volume, pseudo, truth, region.dilated)
    return summary
