"""`diffugts segment`: every stage in one process, without Kubeflow.

INPUT (DICOM folder, zip or s3:// prefix) -> OUT/study -> OUT/attention -> OUT/synthesis ->
OUT/lesions -> OUT/report, with the networks loaded once. The folders are the same
artifacts the pipeline's stages exchange, so any stage can be re-run on its own.

:func:`model_stages` is the middle of it (attend -> synthesize -> refine on one device, the
package read once): the fused GPU task of the pipelines (components/segment.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from diffugts.utils.progress import progress

log = logging.getLogger(__name__)

MODEL_STAGES = ("attend", "synthesize", "refine")
STAGES = ("ingest", *MODEL_STAGES, "report")


class ModelStages:
    """The networks of one package, loaded once, and the three stages that use them."""

    def __init__(self, model: str, device: str | None = None, synthesis=None, min_volume_ml: float | None = None,
                 seed: int = 0, maps: str = "aova"):
        from diffugts.stages.attend import Method, check_maps, check_training_free, load_head
        from diffugts.stages.refine import DEFAULT_MIN_VOLUME_ML, RefineHead
        from diffugts.stages.synthesize import Params

        check_maps(maps)
        self.model = model
        self.method = Method.load(model, device, head=maps == "aova")
        if maps == "training-free":
            check_training_free(self.method)  # before any stage runs
        self.refine_head = load_head(self.method.package, "refine", RefineHead).to(self.method.device)
        self.params = synthesis or Params()
        self.min_volume_ml = DEFAULT_MIN_VOLUME_ML if min_volume_ml is None else min_volume_ml
        self.seed = seed
        self.maps = maps  # "aova" or "training-free" (diffugts.stages.attend.MAPS)

    def run(self, stage: str, study: Path, prompts: list[str], attention: Path, synthesis: Path,
            lesions: Path) -> dict:
        if stage == "attend":
            from diffugts.stages.attend import attend

            return attend(study, self.model, prompts, attention, method=self.method, seed=self.seed, maps=self.maps)
        if stage == "synthesize":
            from diffugts.stages.synthesize import synthesize

            return synthesize(study, self.model, synthesis, attention=attention, params=self.params,
                              backbone=self.method.backbone, show_progress=False)
        if stage == "refine":
            from diffugts.stages.refine import refine

            return refine(study, attention, synthesis, self.model, lesions, min_volume_ml=self.min_volume_ml,
                          backbone=self.method.backbone, head=self.refine_head)
        raise ValueError(f"not a model stage: {stage}")


def model_stages(study, model: str, prompts: list[str], attention, synthesis, lesions, *,
                 device: str | None = None, params=None, min_volume_ml: float | None = None, seed: int = 0,
                 maps: str = "aova", show_progress: bool = False) -> dict:
    """Attention maps, pseudo-healthy synthesis and residual refinement of one ingested study,
    written to the three artifact folders; returns each stage's summary and the timings."""
    from diffugts.errors import ConfigError

    if not prompts:
        raise ConfigError("give at least one --prompt")
    clock = time.perf_counter()
    runner = ModelStages(model, device, params, min_volume_ml, seed, maps)
    result: dict = {"timings_s": {"load": round(time.perf_counter() - clock, 3)}}
    for stage in progress(MODEL_STAGES, desc="model stages", unit="stage", enable=show_progress):
        clock = time.perf_counter()
        result[stage] = runner.run(stage, Path(study), prompts, Path(attention), Path(synthesis), Path(lesions))
        result["timings_s"][stage] = round(time.perf_counter() - clock, 3)
    return result


def invalidate(input_ref: str, folders: list[Path]) -> None:
    """Remove the artifacts of an earlier run in ``folders`` (and staging folders a killed run
    left) before anything starts: a run that fails part-way must not leave an earlier run's
    report or lesions looking like its own. Refused when a folder overlaps the input."""
    import os
    import shutil

    from diffugts.utils import atomic
    from diffugts.errors import ConfigError

    if not str(input_ref).startswith("s3://"):
        source = Path(input_ref).resolve()
        for folder in folders:
            target = folder.resolve()
            if target == source or target in source.parents or source in target.parents:
                raise ConfigError(f"{os.fspath(folder)}: the output folder overlaps the input; "
                                  "choose an --out outside it")
    for folder in folders:
        atomic.remove_stale_partials(folder)
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        elif folder.is_dir():
            shutil.rmtree(folder)


def segment(input_ref: str, out: str | Path, prompts: list[str], *, model: str | None = None,
            device: str | None = None, rules: str = "default", resample: bool = False,
            synthesis=None, min_volume_ml: float | None = None, report: bool = True,
            upload: str | None = None, maps: str = "aova", show_progress: bool = True) -> dict:
    from diffugts.stages.attend import check_maps
    from diffugts.errors import ConfigError
    from diffugts.stages.ingest import ingest
    from diffugts.models.defaults import default_model

    if not prompts:
        raise ConfigError("give at least one --prompt")
    check_maps(maps)  # before ingest
    out = Path(out)
    model = model or default_model()
    folders = {"study": out / "study", "attention": out / "attention", "synthesis": out / "synthesis",
               "lesions": out / "lesions"}
    invalidate(input_ref, [*folders.values(), out / "report"])
    keys = {"attend": "attention", "synthesize": "synthesis", "refine": "lesions"}
    timings: dict[str, float] = {}
    bar = progress(STAGES if report else STAGES[:-1], desc="segment", unit="stage", enable=show_progress)
    clock = time.perf_counter()
    result: dict = {"out": str(out)}
    for stage in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(stage)
        if stage == "ingest":
            # The model first: a package that cannot do what was asked fails before any output.
            runner = ModelStages(model, device, synthesis, min_volume_ml, maps=maps)
            ingested = ingest(input_ref, folders["study"], rules=rules, resample_grid=resample, show_progress=False)
            result["series"] = ingested.series["series_label"]
        elif stage in MODEL_STAGES:
            result[keys[stage]] = runner.run(stage, folders["study"], prompts, folders["attention"],
                                             folders["synthesis"], folders["lesions"])
        elif stage == "report":
            from diffugts.stages.report import make_report

            result["report"] = make_report(folders["study"], folders["lesions"], out / "report",
                                           attention_dir=folders["attention"], synthesis_dir=folders["synthesis"],
                                           upload=upload)
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now
    result["timings_s"] = timings
    return result
