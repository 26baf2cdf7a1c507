"""The cohort pipeline: every new study under a prefix (or in a CSV) through the study pipeline.

    exit handler (record_run: _runs/cohort-<run>.json + Pushgateway)
    └─ list_studies ─> studies: ParallelFor (at most PARALLELISM at once)
                      │     fused study pipeline ─> mark_done
                      └─> cohort_report (runs when studies failed too)

Why the fan-out sits in its own graph component (``cohort_studies``): on the KFP backend an
``ignore_upstream_failure()`` task is compiled to an Argo exit hook on the task it depends on,
and hooks are attached to DAG tasks but not to ParallelFor tasks; behind a graph component the
cohort report has a DAG task to hang on. It must depend on that task alone (a hook per
dependency would run it once per dependency), so it reads what it needs from ``results_uri``.

A failed study fails its loop iteration, so the run ends "Failed" in the KFP UI; every other
study still runs, and the cohort report lists the failed ones with their reasons.
"""

import os

from kfp import dsl

from components.cohort import cohort_report, list_studies, mark_done, record_run
from pipelines.resources import cpu_stage
from pipelines.study_fused import study_fused_pipeline

# Studies processed at once. KFP takes ParallelFor's parallelism at compile time only (a
# pipeline parameter cannot set it): change it here or with DIFFUGTS_COHORT_PARALLELISM when
# running `make compile` (one study holds one GPU for its model task).
PARALLELISM = int(os.environ.get("DIFFUGTS_COHORT_PARALLELISM", "4"))
DEFAULT_PROMPTS = ["liver tumor", "kidney tumor", "pancreas tumor"]


def _bookkeeping(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """Small CPU steps that read and write results_uri: never cached (their effect is the
    write, and listing must see today's studies); retried, S3 hiccups are transient."""
    cpu_stage(task, name, cpu="1", memory="2G")
    return task.set_caching_options(False).set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)


@dsl.pipeline(name="diffugts-cohort-studies", description="The studies of a cohort run, in parallel.")
def cohort_studies(pending: list, model_uri: str, prompts: list, rules: str, resample: bool, min_volume_ml: float,
                   results_uri: str, maps: str):
    with dsl.ParallelFor(pending, parallelism=PARALLELISM) as study:
        # Caching stays on for the stages (deterministic given their inputs); the report is
        # published by mark_done, which runs every time.
        # The fused study pipeline: three pods per study instead of five (pipelines/study_fused.py).
        segmented = study_fused_pipeline(input_uri=study.input_uri, model_uri=model_uri, prompts=prompts, rules=rules,
                                   resample=resample, min_volume_ml=min_volume_ml, upload=False, results_uri="",
                                   maps=maps)
        segmented.set_display_name("Study")
        _bookkeeping(mark_done(report=segmented.output, key=study.key, model_sha256=study.model_sha256,
                               params_hash=study.params_hash, results_uri=results_uri,
                               run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "Mark done")


@dsl.pipeline(
    name="diffugts-cohort",
    description="Zero-shot tumor segmentation of every new study under a prefix (or listed in a CSV): "
    "studies done before with the same model and parameters are skipped; a cohort report lists every study.",
)
def cohort_pipeline(
    studies_uri: str = "s3://diffugts/studies/incoming/",
    model_uri: str = "s3://diffugts/models/diffugts/",
    results_uri: str = "s3://diffugts/results/",
    studies_csv: str = "",
    prompts: list = DEFAULT_PROMPTS,
    rules: str = "default",
    resample: bool = False,
    min_volume_ml: float = 0.1,
    force: bool = False,
    maps: str = "aova",
):
    """Segment a cohort.

    Args:
        studies_uri: Where the studies are: an s3:// prefix whose sub-prefixes (or .zip objects) are studies, or a local folder of study folders.
        model_uri: The model package: an s3:// prefix or folder (manifest + safetensors).
        results_uri: Where results go: per study <results_uri>/<StudyInstanceUID>/report/, the cohort report under <results_uri>/cohort/<run id>/, bookkeeping under <results_uri>/_runs/.
        studies_csv: Optional CSV (s3:// object or file) with an input_uri column: these studies instead of listing studies_uri.
        prompts: What to segment, free text, e.g. ["liver tumor", "pancreatic cyst"].
        rules: Series selection rules: "default", "permissive" or a JSON document.
        resample: Resample gantry-tilted or oblique series instead of rejecting them.
        min_volume_ml: Lesions smaller than this (mL) are dropped.
        force: Process every study, also those done before with this model and these parameters.
        maps: Attention maps from the trained AOVA head ("aova") or, for 2D diffusers models, the backbone's own cross-attention ("training-free").
    """
    record = _bookkeeping(record_run(results_uri=results_uri, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                          "Record run")
    with dsl.ExitHandler(record, name="cohort"):
        listing = _bookkeeping(list_studies(studies_uri=studies_uri, studies_csv=studies_csv, model_uri=model_uri,
                                            results_uri=results_uri, prompts=prompts, rules=rules, resample=resample,
                                            min_volume_ml=min_volume_ml, force=force, maps=maps,
                                            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "List studies")
        studies = cohort_studies(pending=listing.outputs["Output"], model_uri=model_uri, prompts=prompts, rules=rules,
                                 resample=resample, min_volume_ml=min_volume_ml, results_uri=results_uri, maps=maps)
        studies.set_display_name("Studies")
        report = cohort_report(results_uri=results_uri, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, rules=rules,
                               resample=resample)
        # Diagnosing failed studies re-reads them (see diffugts.cohort.diagnose): room for one CT.
        cpu_stage(report, "Cohort report", cpu="2", memory="8G")
        report.set_caching_options(False).set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
        report.after(studies).ignore_upstream_failure()
