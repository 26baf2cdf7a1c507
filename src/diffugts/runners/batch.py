"""Cohorts at scale: the pending studies of a run in batches, a batch in one process.

A cohort of 10,000 studies as one pipeline task per study makes an Argo Workflow of well over
100,000 nodes (benchmarks/workflow_size.py): more than Kubernetes stores in one object, and more
pods at once than a GPU pool should get. So the cohort pipeline runs *batches*: one GPU task
per batch loads the model once and takes its studies one after another (ingestion, the model
stages, the report, the ``done`` marker), and the batches run in at most ``max_parallel`` lanes.

- A failed study never sinks its batch: its error is recorded (``failed.json`` and its marker,
  as :func:`diffugts.runners.cohort.record_failure`) and the next study starts.
- A batch that is retried (pod lost, out of memory) skips the studies already done in this run.
- ``batch_size`` is the least number of studies per task; it grows so that a run never has more
  than ``max_batches`` tasks, which bounds the Workflow's node count and status size whatever
  the cohort's size.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from diffugts.config import DEFAULT_MIN_VOLUME_ML, MapMode
from diffugts.errors import ConfigError, InputError
from diffugts.runners import cohort

DEFAULT_BATCH_SIZE = 8  # studies per GPU task: a few minutes of work on one GPU, one model load
DEFAULT_MAX_PARALLEL = 4  # GPU tasks at once
# Bounds of the Workflow's size whatever the cohort's (benchmarks/workflow_size.py: with both
# at their maximum a run's Argo status stays under 1 MB, under 400 nodes).
MAX_BATCHES = 24  # batch tasks per run at most
MAX_PARALLEL = 16  # lanes (GPU tasks at once) at most


def plan_batches(
    keys: list[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    max_batches: int = MAX_BATCHES,
) -> dict:
    """Split ``keys`` into batches of at least ``batch_size`` (more when there would be over
    ``max_batches``), dealt round-robin into at most ``max_parallel`` lanes (lists of batch
    numbers, run one after another)."""
    if batch_size < 1 or max_parallel < 1 or max_batches < 1:
        raise ConfigError(
            f"batch_size, max_parallel and max_batches must be at least 1 "
            f"(got {batch_size}, {max_parallel}, {max_batches})"
        )
    if max_parallel > MAX_PARALLEL:
        raise ConfigError(
            f"max_parallel is at most {MAX_PARALLEL} (got {max_parallel}): each lane adds to the "
            "run's Argo Workflow, which must stay under the size Kubernetes stores"
        )
    size = max(batch_size, math.ceil(len(keys) / max_batches)) if keys else batch_size
    batches = [keys[i : i + size] for i in range(0, len(keys), size)]
    lanes = [list(range(lane, len(batches), max_parallel)) for lane in range(min(max_parallel, len(batches)))]
    return {"batch_size": size, "batches": batches, "lanes": lanes}


def _done(marker: dict | None, item: dict, run: str) -> bool:
    """Done by an earlier attempt of this run's batch. A ``done`` marker of an earlier run is
    not: the study is pending because the run was forced, and is processed (and re-published)."""
    return (
        marker is not None
        and bool(marker)
        and marker.get("status") == "done"
        and marker.get("run") == run
        and marker.get("model_sha256") == item["model_sha256"]
        and marker.get("params_hash") == item["params_hash"]
    )


def run_batch(
    results_uri: str,
    run: str,
    batch: int,
    *,
    model_uri: str,
    prompts: list[str],
    rules: str = "default",
    resample: bool = False,
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
    maps: str = MapMode.AOVA,
    device: str | None = None,
    work_dir: str | None = None,
    verifier_threshold: float | None = None,
) -> dict:
    """Process batch ``batch`` of run ``run`` (its studies from the run's listing.json).
    Returns the counts: done, failed, already done (a retried batch)."""
    from diffugts.core import Core
    from diffugts.runners.segment import FOLDERS, MODEL_STAGES, StudyRun, method_params
    from diffugts.stages.ingest import ingest

    listing = cohort.read_listing(results_uri, run)
    batches = listing.get("batches") or []
    if not 0 <= batch < len(batches):
        raise InputError(cohort.run_uri(results_uri, run), f"run has {len(batches)} batches, no batch {batch}")
    items = {item["key"]: item for item in listing["pending"]}
    params = method_params(min_volume_ml=min_volume_ml, maps=maps, verifier_threshold=verifier_threshold)
    core = Core(model_uri, device, params).load()  # once per batch
    if core.package.sha256 != listing["model_sha256"]:
        raise InputError(model_uri, "the model changed since the studies were listed: start a new run")
    counts = {"done": 0, "failed": 0, "already_done": 0}
    work_root = Path(tempfile.mkdtemp(prefix="batch-", dir=work_dir))
    try:
        for key in batches[batch]:
            item = items[key]
            if _done(cohort.read_marker(results_uri, key), item, run):
                counts["already_done"] += 1
                continue
            work = work_root / key
            stage = "ingest"
            try:
                folders = {key: work / name for key, name in FOLDERS.items()}
                ingest(item["input_uri"], folders["study"], rules=rules, resample_grid=resample, show_progress=False)
                stage = "attend"  # the study is read for the model stages
                study = StudyRun(core, folders["study"], prompts, folders)
                for stage in MODEL_STAGES:
                    study.run(stage)
                stage = "report"
                study.report()
                stage = "publish"
                cohort.mark_done(
                    work / "report",
                    results_uri,
                    key,
                    model_sha256=item["model_sha256"],
                    params_hash=item["params_hash"],
                    run=run,
                )
                counts["done"] += 1
            except Exception as exc:  # one study's failure, whatever it is, is that study's
                cohort.record_failure(results_uri, run, item, stage, exc, work_root / "failures")
                counts["failed"] += 1
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    return counts
