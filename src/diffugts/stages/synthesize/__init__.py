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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffugts.utils import atomic
from diffugts.utils.device import pick_device
from diffugts.errors import ConfigError
from diffugts.stages.preprocess import intensity_range
from diffugts.stages.synthesize.fidelity import GroundTruth, fidelity, mask_truth
from diffugts.stages.synthesize.inpaint import Tiles, inpaint, renoise
from diffugts.stages.synthesize.masks import (MaskSource, Region, bbox, latent_box, latent_footprint, make_region,
                                      mask_from_attention, read_mask, spacing_kji)

__all__ = ["MARKER", "GroundTruth", "Params", "Region", "Tiles", "fidelity", "inpaint", "make_region",
           "mask_from_attention", "mask_truth", "pseudo_healthy", "read_mask", "renoise", "synthesize"]

log = logging.getLogger(__name__)
MARKER = "synthesis.json"
BEYOND_BAND = 0.1  # share of the CT window next to its edges where a synthetic value counts as saturated
NOTHING = "empty mask: nothing to inpaint, the output equals the input"


@dataclass(frozen=True)
class Params:
    """The method's knobs (all recorded in synthesis.json; docs/synthesis.md says why these defaults)."""

    dilation_mm: float = 8.0  # grow the coarse mask so the lesion's border is regenerated too
    strength: float = 0.8  # noise level to start from, fraction of the schedule (1 = pure noise)
    steps: int = 10  # denoising steps from strength * T to 0 (20 gave the same fidelity: docs/synthesis.md)
    jumps: int = 0  # RePaint resampling: re-noise one step back and redo, this many times per step
    seed: int = 0  # the noise draw (CPU generator: same draw on every device)
    context_mm: float = 48.0  # tissue around the mask the denoiser sees
    feather_mm: float = 4.0  # width of the paste-back ramp inside the dilated mask's border
    tile: int | tuple[int, int, int] | None = None  # model voxels per tile side; None: the package's
    tile_overlap: float = 0.5  # fraction of a tile shared with its neighbour (0.25 leaves seams)
    harmonise: bool = True  # shift H by the median x - H of the regenerated ring around the mask

    def validate(self) -> None:
        checks = [
            (self.dilation_mm >= 0, "dilation_mm must be >= 0"),
            (0 < self.strength <= 1, "strength must be in (0, 1]"),
            (self.steps >= 1, "steps must be >= 1"),
            (self.jumps >= 0, "jumps must be >= 0"),
            (self.context_mm >= 0, "context_mm must be >= 0"),
            (self.feather_mm >= 0, "feather_mm must be >= 0"),
            (0 <= self.tile_overlap < 1, "tile_overlap must be in [0, 1)"),
            (self.tile is None or min(np.atleast_1d(self.tile)) > 0, "tile must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"synthesis: {message}")


def synthesize(study_dir, model: str, out_dir, *, mask=None, attention=None, target: int | None = None,
               params: Params = Params(), ground_truth=None, device: str | None = None,
               show_progress: bool = True, backbone=None) -> dict:
    """Write the pseudo-healthy study to ``out_dir`` (``synthesis.json`` last); return the summary.

    Exactly one of ``mask`` (a binary NIfTI on the study grid) and ``attention`` (an attention
    artifact folder; the union of its coarse masks, or ``target`` alone) gives the region.
    ``ground_truth`` (a :class:`GroundTruth`, or a phantom case folder / case.json, read by
    :func:`diffugts.phantom.truth.load_phantom_truth`) adds the fidelity figures. ``backbone``
    skips loading the package's networks (tests, benchmarks).
    """
    from diffugts.models import open_package
    from diffugts.stages.preprocess import Preprocessing
    from diffugts.artifacts.study import load_study

    params.validate()
    if (mask is None) == (attention is None):
        raise ConfigError("give exactly one of --mask and --attention")
    clock = time.perf_counter()
    study = load_study(study_dir)
    if mask is not None:
        coarse, source = read_mask(mask, study.geometry), MaskSource("file", str(mask), [])
    else:
        coarse, source = mask_from_attention(attention, study.geometry, target)
    pkg = open_package(model, verify=bool(coarse.any()))  # nothing to inpaint: no weights are read
    prep = Preprocessing.from_dict(pkg.manifest["preprocessing"])
    if ground_truth is not None and not isinstance(ground_truth, GroundTruth):
        from diffugts.phantom.truth import load_phantom_truth  # the phantom world, only for a case folder

        ground_truth = load_phantom_truth(ground_truth, study.geometry, study.volume)
    region = make_region(coarse, spacing_kji(study.geometry), params.dilation_mm, params.feather_mm)
    timings = {"load": time.perf_counter() - clock}
    if coarse.any():
        import torch

        from diffugts.networks.backbones import load_backbone

        clock = time.perf_counter()
        device = pick_device(device) if backbone is None else next(backbone.parameters()).device
        backbone = backbone or load_backbone(pkg, device)
        timings["model"] = time.perf_counter() - clock
        tile = params.tile or (pkg.manifest.get("inference") or {}).get("roi_size")
        pseudo, inpainting = pseudo_healthy(study.volume, study.geometry, study.modality, region, backbone, prep,
                                            params, tile=tile, show_progress=show_progress, timings=timings)
        used = str(device)
    else:
        pseudo, used, inpainting = study.volume.astype(np.float32, copy=True), None, None
    return _write(Path(out_dir), study, region, pseudo, pkg, params, source, used, inpainting, timings,
                  ground_truth)


def pseudo_healthy(volume: np.ndarray, geometry, modality: str, region: Region, backbone, prep, params: Params,
                   tile=None, show_progress: bool = False, timings: dict | None = None) -> tuple[np.ndarray, dict]:
    """The pseudo-healthy volume on the volume's own grid, and what was done (in memory)."""
    import torch

    from diffugts.stages.preprocess import to_model

    timings = {} if timings is None else timings
    device = next(backbone.parameters()).device
    clock = time.perf_counter()
    x, space = to_model(volume, geometry, modality, prep, device=backbone.resample_device)
    stride = backbone.latent_stride
    footprint = latent_footprint(space.to_model(region.dilated.astype(np.float32)) > 0, stride)
    latent_mm = [s * stride for s in prep.spacing_mm[::-1]]
    margin = tuple(int(math.ceil(params.context_mm / mm)) for mm in latent_mm)
    multiple = max(prep.multiple // stride, 1)  # the model grid is padded to this many latent voxels
    lbox = latent_box(footprint, margin, multiple)
    ibox = tuple(slice(s.start * stride, s.stop * stride) for s in lbox)
    tile_latent = None
    if tile:
        tile_latent = tuple(max(multiple, int(t) // stride // multiple * multiple)
                            for t in np.broadcast_to(np.asarray(tile), (3,)))
    timings["preprocess"] = time.perf_counter() - clock

    stats: dict = {}
    xt = torch.from_numpy(np.ascontiguousarray(x[ibox]))[None, None].to(device)
    mt = torch.from_numpy(np.ascontiguousarray(footprint[lbox]))[None, None].to(device)
    out = inpaint(backbone, xt, mt, tuple(prep.spacing_mm), strength=params.strength, steps=params.steps,
                  jumps=params.jumps, seed=params.seed, tile=tile_latent, overlap=params.tile_overlap,
                  show_progress=show_progress, stats=stats)
    out = out[0, 0].float().cpu().numpy()
    if modality == "CT":
        out = np.clip(out, 0.0, 1.0)  # the model's CT range is the clipped window
    for key in ("encode_s", "denoise_s", "decode_s"):
        timings[key.removesuffix("_s")] = stats[key]

    clock = time.perf_counter()
    full = x.copy()
    full[ibox] = out
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


def _write(out: Path, study, region: Region, pseudo: np.ndarray, pkg, params: Params, source: MaskSource,
           device: str | None, inpainting: dict | None, timings: dict, truth: GroundTruth | None) -> dict:
    from diffugts.artifacts.study import write_image

    clock = time.perf_counter()
    voxel_ml = float(np.prod(study.geometry.spacing)) / 1000.0
    difference = (study.volume.astype(np.float32) - pseudo).astype(np.float32)
    summary = {
        "stage": "synthesize",
        "model": {"name": pkg.name, "sha256": pkg.sha256,
                  "scheduler": pkg.manifest["backbone"]["scheduler"]["class"]},
        "device": device,
        "nothing_to_inpaint": inpainting is None,
        "parameters": asdict(params),
        "mask": {
            "source": source.kind, "path": source.path, "targets": source.targets,
            "coarse_voxels": int(region.mask.sum()), "coarse_ml": round(float(region.mask.sum()) * voxel_ml, 3),
            "dilated_voxels": int(region.dilated.sum()),
            "dilated_ml": round(float(region.dilated.sum()) * voxel_ml, 3),
        },
        "inpainting": inpainting,
        "paste_back": "outside inpaint_mask.nii.gz the output equals the input bit for bit; inside, "
                      "output = w * synthetic + (1 - w) * input with w = 1 on the coarse mask, ramping "
                      "from 0 to 1 over feather_mm inside the dilated mask's border",
        "units": "HU" if study.modality == "CT" else "input units",
        "files": {"pseudo_healthy": "pseudo_healthy.nii.gz", "difference": "difference.nii.gz",
                  "inpaint_mask": "inpaint_mask.nii.gz"},
    }
    if inpainting is None:
        summary["note"] = NOTHING
    if truth is not None:
        summary["fidelity"] = fidelity(study.volume, pseudo, truth, region.dilated)
    with atomic.staging_dir(out, marker=MARKER) as stage:
        write_image(stage / "pseudo_healthy.nii.gz", pseudo, study.geometry)
        write_image(stage / "difference.nii.gz", difference, study.geometry)
        write_image(stage / "inpaint_mask.nii.gz", region.dilated.astype(np.uint8), study.geometry)
        timings["write"] = time.perf_counter() - clock
        summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        atomic.write_json(stage / MARKER, summary)
    return summary
