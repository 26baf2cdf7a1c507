"""`diffugts segment`: every stage in one process, without Kubeflow.

INPUT (DICOM folder, zip or s3:// prefix) -> OUT/study -> OUT/attention -> OUT/synthesis ->
OUT/lesions -> OUT/report, with the networks loaded once. The folders are the same
artifacts the pipeline's stages exchange, so any stage can be re-run on its own.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from diffugts.progress import progress

log = logging.getLogger(__name__)

STAGES = ("ingest", "attend", "synthesize", "refine", "report")


def segment(input_ref: str, out: str | Path, prompts: list[str], *, model: str | None = None,
            device: str | None = None, rules: str = "default", resample: bool = False,
            synthesis=None, min_volume_ml: float | None = None, report: bool = True,
            upload: str | None = None, show_progress: bool = True) -> dict:
    from diffugts.attend import Method, attend, load_head
    from diffugts.errors import ConfigError
    from diffugts.ingest import ingest
    from diffugts.models.defaults import default_model
    from diffugts.refine import DEFAULT_MIN_VOLUME_ML, RefineHead, refine
    from diffugts.synthesis import Params, synthesize

    if not prompts:
        raise ConfigError("give at least one --prompt")
    out = Path(out)
    model = model or default_model()
    timings: dict[str, float] = {}
    bar = progress(STAGES if report else STAGES[:-1], desc="segment", unit="stage", enable=show_progress)
    clock = time.perf_counter()
    result: dict = {"out": str(out)}
    for stage in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(stage)
        if stage == "ingest":
            ingested = ingest(input_ref, out / "study", rules=rules, resample_grid=resample,
                              show_progress=False)
            result["series"] = ingested.series["series_label"]
            method = Method.load(model, device)
            refine_head = load_head(method.package, "refine", RefineHead).to(method.device)
        elif stage == "attend":
            result["attention"] = attend(out / "study", model, prompts, out / "attention", method=method)
        elif stage == "synthesize":
            result["synthesis"] = synthesize(out / "study", model, out / "synthesis", attention=out / "attention",
                                             params=synthesis or Params(), backbone=method.backbone,
                                             show_progress=False)
        elif stage == "refine":
            result["lesions"] = refine(out / "study", out / "attention", out / "synthesis", model, out / "lesions",
                                       min_volume_ml=DEFAULT_MIN_VOLUME_ML if min_volume_ml is None else min_volume_ml,
                                       backbone=method.backbone, head=refine_head)
        elif stage == "report":
            from diffugts.report import make_report

            result["report"] = make_report(out / "study", out / "lesions", out / "report",
                                           attention_dir=out / "attention", synthesis_dir=out / "synthesis",
                                           upload=upload)
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now
    result["timings_s"] = timings
    return result
