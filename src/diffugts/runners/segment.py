"""`diffugts segment`: every stage in one process, without Kubeflow.

INPUT (DICOM folder, zip or s3:// prefix) -> OUT/study -> OUT/attention -> OUT/synthesis ->
OUT/lesions -> OUT/report. The model package is opened and its networks loaded once
(:class:`diffugts.core.Core`); the study is read once and put on the model grid once; each
stage's artifact is handed on in memory and written as it is made, so the folders are the same
artifacts the pipeline's stages exchange and any stage can be re-run on its own.

:class:`StudyRun` is one study through the stages with a loaded core: what ``segment``, the
fused GPU task of the pipelines (:func:`model_stages`, components/segment.py) and cohort
batches (diffugts.runners.batch) run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from diffugts.config import (
    DEFAULT_MIN_VOLUME_ML,
    DEFAULT_SEED,
    AttentionParams,
    MapMode,
    MethodParams,
    RefineParams,
    SynthesisParams,
)
from diffugts.stages.attend import check_prompts
from diffugts.utils.progress import progress

if TYPE_CHECKING:
    from diffugts.artifacts.attention import Attention
    from diffugts.artifacts.lesions import Lesions
    from diffugts.artifacts.synthesis import Synthesis

log = logging.getLogger(__name__)

MODEL_STAGES = ("attend", "synthesize", "refine")
STAGES = ("ingest", *MODEL_STAGES, "report")
FOLDERS = {
    "study": "study",
    "attention": "attention",
    "synthesis": "synthesis",
    "lesions": "lesions",
    "report": "report",
}


def method_params(
    synthesis: SynthesisParams | None = None,
    min_volume_ml: float | None = None,
    seed: int = DEFAULT_SEED,
    maps: str = MapMode.AOVA,
    verifier_threshold: float | None = None,
) -> MethodParams:
    """The runners' keyword arguments as :class:`~diffugts.config.MethodParams` (None: default)."""
    return MethodParams(
        AttentionParams(maps=MapMode.parse(maps), seed=seed),
        synthesis or SynthesisParams(),
        RefineParams(DEFAULT_MIN_VOLUME_ML if min_volume_ml is None else min_volume_ml, verifier_threshold),
    )


class StudyRun:
    """One ingested study through the model stages of a loaded :class:`~diffugts.core.Core`:
    each stage's artifact is made in memory, handed to the next and written to its folder
    (``folders``: study, attention, synthesis, lesions, report)."""

    def __init__(self, core, study_dir: Path, prompts: list[str], folders: dict[str, Path]):
        from diffugts.artifacts.study import load_study

        self.core = core
        self.prompts = prompts
        self.folders = folders
        self.study = load_study(study_dir)
        self.prepared = core.prepare(self.study)
        self.attention: Attention | None = None
        self.synthesis: Synthesis | None = None
        self.lesions: Lesions | None = None

    def run(self, stage: str) -> dict:
        return getattr(self, stage)()

    def attend(self) -> dict:
        from diffugts.artifacts import attention

        made = self.attention = self.core.attend(self.prepared, self.prompts)
        return attention.write(self.folders["attention"], made, self.study.geometry)

    def synthesize(self) -> dict:
        from diffugts.artifacts import synthesis

        assert self.attention is not None  # attend came first
        made = self.synthesis = self.core.synthesize(self.prepared, self.attention)
        return synthesis.write(self.folders["synthesis"], made, self.study.volume, self.study.geometry)

    def refine(self) -> dict:
        from diffugts.artifacts import lesions

        clock = time.perf_counter()
        assert self.attention is not None and self.synthesis is not None  # attend and synthesize came first
        made = self.lesions = self.core.refine(self.prepared, self.attention, self.synthesis)
        summary = lesions.write(self.folders["lesions"], made, self.study.geometry)
        return dict(summary, timings={"refine_s": round(time.perf_counter() - clock, 3)})

    def report(self, upload: str | None = None) -> dict:
        from diffugts.stages.report import make_report

        f = self.folders
        loaded = {
            "study": self.study,
            "lesions": self.lesions,
            "attention": self.attention,
            "synthesis": self.synthesis,
        }
        return make_report(
            f["study"],
            f["lesions"],
            f["report"],
            attention_dir=f["attention"],
            synthesis_dir=f["synthesis"],
            upload=upload,
            loaded=loaded,
        )


def model_stages(
    study,
    model: str,
    prompts: list[str],
    attention,
    synthesis,
    lesions,
    *,
    device: str | None = None,
    params: SynthesisParams | None = None,
    min_volume_ml: float | None = None,
    seed: int = DEFAULT_SEED,
    maps: str = MapMode.AOVA,
    show_progress: bool = False,
    verifier_threshold: float | None = None,
) -> dict:
    """Attention maps, pseudo-healthy synthesis and residual refinement of one ingested study,
    written to the three artifact folders; returns each stage's summary and the timings."""
    from diffugts.core import Core

    check_prompts(prompts)
    clock = time.perf_counter()
    core = Core(model, device, method_params(params, min_volume_ml, seed, maps, verifier_threshold)).load()
    folders = {"attention": Path(attention), "synthesis": Path(synthesis), "lesions": Path(lesions)}
    run = StudyRun(core, Path(study), prompts, folders)
    result: dict = {"timings_s": {"load": round(time.perf_counter() - clock, 3)}}
    for stage in progress(MODEL_STAGES, desc="model stages", unit="stage", enable=show_progress):
        clock = time.perf_counter()
        result[stage] = run.run(stage)
        result["timings_s"][stage] = round(time.perf_counter() - clock, 3)
    return result


def invalidate(input_ref: str, folders: list[Path]) -> None:
    """Remove the artifacts of an earlier run in ``folders`` (and staging folders a killed run
    left) before anything starts: a run that fails part-way must not leave an earlier run's
    report or lesions looking like its own. Refused when a folder overlaps the input."""
    import os
    import shutil

    from diffugts.errors import ConfigError
    from diffugts.utils import atomic

    if not str(input_ref).startswith("s3://"):
        source = Path(input_ref).resolve()
        for folder in folders:
            target = folder.resolve()
            if target == source or target in source.parents or source in target.parents:
                raise ConfigError(
                    f"{os.fspath(folder)}: the output folder overlaps the input; choose an output folder outside it"
                )
    for folder in folders:
        atomic.remove_stale_partials(folder)
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        elif folder.is_dir():
            shutil.rmtree(folder)


def segment(
    input_ref: str,
    out: str | Path,
    prompts: list[str],
    *,
    model: str | None = None,
    device: str | None = None,
    rules: str = "default",
    resample: bool = False,
    synthesis: SynthesisParams | None = None,
    min_volume_ml: float | None = None,
    report: bool = True,
    upload: str | None = None,
    maps: str = MapMode.AOVA,
    show_progress: bool = True,
    core=None,
    verifier_threshold: float | None = None,
) -> dict:
    """Every stage on one input. ``core``: a loaded :class:`~diffugts.core.Core` to reuse
    (then ``model``, ``device``, ``synthesis``, ``min_volume_ml``, ``maps`` and
    ``verifier_threshold`` are its own); without it, one is made for this input."""
    from diffugts.core import Core
    from diffugts.models.defaults import default_model
    from diffugts.stages.ingest import ingest

    check_prompts(prompts)
    # checked before ingest
    params = method_params(synthesis, min_volume_ml, maps=maps, verifier_threshold=verifier_threshold)
    out = Path(out)
    model = model or (None if core else default_model())
    folders = {key: out / name for key, name in FOLDERS.items()}
    invalidate(input_ref, list(folders.values()))
    keys = {"attend": "attention", "synthesize": "synthesis", "refine": "lesions"}
    timings: dict[str, float] = {}
    bar = progress(STAGES if report else STAGES[:-1], desc="segment", unit="stage", enable=show_progress)
    clock = time.perf_counter()
    result: dict = {"out": str(out)}
    run = None
    for stage in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(stage)
        if stage == "ingest":
            # The model first: a package that cannot do what was asked fails before any output.
            core = core or Core(model or default_model(), device, params).load()
            ingested = ingest(input_ref, folders["study"], rules=rules, resample_grid=resample, show_progress=False)
            result["series"] = ingested.series["series_label"]
            run = StudyRun(core, folders["study"], prompts, folders)
        elif stage in MODEL_STAGES:
            assert run is not None  # ingest comes first
            result[keys[stage]] = run.run(stage)
        elif stage == "report":
            assert run is not None
            result["report"] = run.report(upload)
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now
    result["timings_s"] = timings
    return result
