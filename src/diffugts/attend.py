"""Stage 2: anomaly-aware open-vocabulary attention maps for a study.

Study volume -> model grid -> frozen backbone features -> AOVA head, tiled with MONAI's
sliding-window inferer so large volumes never hold full-resolution features at once ->
per-prompt anomaly probability and coarse mask, mapped back onto the exact study grid.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffugts import atomic
from diffugts.aova import AOVAHead, top_mean
from diffugts.backbones import Backbone, load_backbone
from diffugts.backbones.maisi import load_strict
from diffugts.device import pick_device
from diffugts.errors import ConfigError
from diffugts.models.package import ModelPackage, open_package
from diffugts.preprocess import ModelSpace, Preprocessing, to_model
from diffugts.study import Study, load_study, write_image
from diffugts.text import Target, TextEncoder, make_target

log = logging.getLogger(__name__)
MARKER = "attention.json"
DEFAULT_THRESHOLD = 0.5  # used when the package does not set one


@dataclass
class Method:
    """Everything a model package brings to the attention stage, loaded once."""

    package: ModelPackage
    backbone: Backbone
    head: AOVAHead
    text: TextEncoder
    prep: Preprocessing
    device: torch.device

    @classmethod
    def load(cls, model: str, device: str | torch.device | None = None) -> "Method":
        device = pick_device(device) if not isinstance(device, torch.device) else device
        pkg = open_package(model)
        backbone = load_backbone(pkg, device)
        head = load_head(pkg, "aova", AOVAHead).to(device)
        text = TextEncoder(text_encoder_path(pkg), device=device)
        return cls(pkg, backbone, head, text, Preprocessing.from_dict(pkg.manifest["preprocessing"]), device)

    @property
    def roi_size(self) -> tuple[int, int, int] | None:
        roi = self.package.manifest.get("inference", {}).get("roi_size")
        return tuple(roi) if roi else None


def load_head(pkg: ModelPackage, name: str, cls):
    if not pkg.has(name):
        raise ConfigError(f"{pkg.root}: the model has no trained {name} head (train it with `diffugts train {name}`)")
    net = cls.from_config(pkg.network(name)["config"])
    load_strict(net, pkg.state_dict(name), f"{pkg.root}: {name}")
    return net.eval().requires_grad_(False)


def text_encoder_path(pkg: ModelPackage) -> Path | None:
    entry = pkg.manifest.get("text_encoder", {})
    return pkg.root / entry["path"] if entry.get("path") else None


def prompt_tensors(method: Method, targets: list[Target]) -> tuple[torch.Tensor, list[tuple[list[int], ...]]]:
    """All prompts embedded once, and per target the indices of its generic normal, organ
    normal and abnormal prompts."""
    texts = list(dict.fromkeys(p for t in targets for p in t.prompts))
    groups = [t.groups(texts.index) for t in targets]
    return method.text.embed(texts).to(method.device), groups


@torch.no_grad()
def attention_maps(method: Method, x: np.ndarray, spacing, targets: list[Target], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly probability (T, *grid) on the model grid and image-level scores (T,)."""
    from monai.inferers import sliding_window_inference

    prompts, groups = prompt_tensors(method, targets)
    xt = torch.from_numpy(x)[None, None].to(method.device)
    index = method.backbone.feature_index(method.package.network("aova")["features"])

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=method.device).manual_seed(seed)
        feats = method.backbone.features(patch, spacing, generator=gen)
        out = method.head([feats[i] for i in index], prompts, groups, out_shape=tuple(patch.shape[2:]))
        return out.log_odds

    roi = method.roi_size or tuple(x.shape)
    roi = tuple(min(r, s) for r, s in zip(roi, x.shape))
    log_odds = sliding_window_inference(xt, roi, sw_batch_size=1, predictor=predictor, overlap=0.25, mode="gaussian")
    a, b = method.head.score_affine
    score = torch.sigmoid(a * top_mean(log_odds, method.head.top_fraction) + b)
    return torch.sigmoid(log_odds)[0].float().cpu().numpy(), score[0].float().cpu().numpy()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def attend(study_dir, model: str, prompts: list[str], out_dir, *, threshold: float | None = None,
           device: str | None = None, seed: int = 0, method: Method | None = None) -> dict:
    """Write per-prompt maps and coarse masks on the study grid, and ``attention.json`` last."""
    if not prompts:
        raise ConfigError("give at least one --prompt")
    study = load_study(study_dir)
    method = method or Method.load(model, device)
    if threshold is None:
        threshold = float(method.package.network("aova").get("threshold", DEFAULT_THRESHOLD))
    targets = [make_target(p) for p in prompts]
    t0 = time.perf_counter()
    x, space = to_model(study.volume, study.geometry, study.modality, method.prep)
    probs, scores = attention_maps(method, x, tuple(method.prep.spacing_mm), targets, seed=seed)
    timings = {"attention_s": round(time.perf_counter() - t0, 3)}
    return write_attention(Path(out_dir), study, space, targets, probs, scores, threshold, method, timings)


def write_attention(out: Path, study: Study, space: ModelSpace, targets: list[Target], probs: np.ndarray,
                    scores: np.ndarray, threshold: float, method: Method, timings: dict) -> dict:
    voxel_ml = float(np.prod(study.geometry.spacing)) / 1000.0
    entries = []
    with atomic.staging_dir(out, marker=MARKER) as stage:
        (stage / "maps").mkdir()
        (stage / "masks").mkdir()
        for n, (target, prob, score) in enumerate(zip(targets, probs, scores)):
            on_study = np.clip(space.to_study(prob), 0.0, 1.0).astype(np.float32)
            mask = (on_study >= threshold).astype(np.uint8)
            name = f"{n:02d}-{slug(target.text)}"
            write_image(stage / "maps" / f"{name}.nii.gz", on_study, study.geometry)
            write_image(stage / "masks" / f"{name}.nii.gz", mask, study.geometry)
            entries.append({
                "index": n,
                "prompt": target.as_dict(),
                "score": round(float(score), 4),
                "threshold": threshold,
                "coarse_volume_ml": round(float(mask.sum()) * voxel_ml, 3),
                "max_probability": round(float(on_study.max()), 4),
                "map": f"maps/{name}.nii.gz",
                "mask": f"masks/{name}.nii.gz",
            })
        summary = {
            "stage": "attend",
            "model": {"name": method.package.name, "sha256": method.package.sha256},
            "device": str(method.device),
            "targets": entries,
            "timings": timings,
        }
        atomic.write_json(stage / MARKER, summary)
    return summary
