"""The cohort pipeline: every new study under a prefix (or in a CSV), in batches on the GPU.

    exit handler (record_run: _runs/cohort-<run>.json + Pushgateway)
    └─ list_studies ─> lanes: ParallelFor (at most max_parallel lanes)
                      │     lane: ParallelFor over its batches, one at a time
                      │           segment_batch (GPU; per study: ingest, model stages, report, done marker)
                      └─> cohort_report (runs when batches failed too)

Why batches (diffugts.runners.batch, benchmarks/workflow_size.py): a task per study makes an Argo
Workflow of over 100,000 nodes for 10,000 studies, past what Kubernetes stores in one object.
A batch task loads the model once and takes its studies one after another; a failed study is
recorded and the batch goes on. The run has at most diffugts.runners.batch.MAX_BATCHES batch tasks, so
the Workflow stays small whatever the cohort's size.

Why lanes: KFP takes ParallelFor's ``parallelism`` at compile time only. A lane is a loop over
batch numbers with parallelism 1; ``list_studies`` deals the batches into ``max_parallel``
lanes, so the number of GPU tasks at once is a pipeline parameter.

Why the fan-out sits in its own graph component (``cohort_studies``): on the KFP backend an
``ignore_upstream_failure()`` task is compiled to an Argo exit hook on the task it depends on,
and hooks are attached to DAG tasks but not to ParallelFor tasks; behind a graph component the
cohort report has a DAG task to hang on. It must depend on that task alone (a hook per
dependency would run it once per dependency), so it reads what it needs from ``results_uri``.

Batch tasks are never cached: their effect is the results and markers they write, and the
markers (model sha256 + parameters hash) are what skips a study done before.
"""

from kfp import dsl

from components.cohort import cohort_report, list_studies, record_run, segment_batch
from diffugts.config import DEFAULT_MIN_VOLUME_ML, PIPELINE_MODEL_THRESHOLD, MapMode
from pipelines.resources import cpu_stage, gpu_stage

DEFAULT_PROMPTS = ["liver tumor", "kidney tumor", "pancreas tumor"]


def _bookkeeping(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """Small CPU steps that read and write results_uri: never cached (their effect is the
    write, and listing must see today's studies); retried, S3 hiccups are transient."""
    cpu_stage(task, name, cpu="1", memory="2G")
    return task.set_caching_options(False).set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)


@dsl.pipeline(name="diffugts-cohort-lane", description="Batches of a cohort run, one after another.")
def cohort_lane(
    lane: list,
    model_uri: str,
    prompts: list,
    rules: str,
    resample: bool,
    min_volume_ml: float,
    results_uri: str,
    maps: str,
    verifier_threshold: float,
):
    with dsl.ParallelFor(lane, parallelism=1) as batch:
        task = segment_batch(
            results_uri=results_uri,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            batch=batch,
            model_uri=model_uri,
            prompts=prompts,
            rules=rules,
            resample=resample,
            min_volume_ml=min_volume_ml,
            maps=maps,
            verifier_threshold=verifier_threshold,
        )
        gpu_stage(task, "Batch of studies")
        # A retry skips the studies the lost attempt finished (their done markers).
        task.set_caching_options(False).set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)


@dsl.pipeline(name="diffugts-cohort-studies", description="The batches of a cohort run, in lanes.")
def cohort_studies(
    lanes: list,
    model_uri: str,
    prompts: list,
    rules: str,
    resample: bool,
    min_volume_ml: float,
    results_uri: str,
    maps: str,
    verifier_threshold: float,
):
    with dsl.ParallelFor(lanes) as lane:
        cohort_lane(
            lane=lane,
            model_uri=model_uri,
            prompts=prompts,
            rules=rules,
            resample=resample,
            min_volume_ml=min_volume_ml,
            results_uri=results_uri,
            maps=maps,
            verifier_threshold=verifier_threshold,
        ).set_display_name("Lane")


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
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
    force: bool = False,
    maps: str = MapMode.AOVA.value,
    batch_size: int = 8,
    max_parallel: int = 4,
    verifier_threshold: float = PIPELINE_MODEL_THRESHOLD,
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
        batch_size: Studies per GPU task, at least (more when the cohort would need over 24 tasks, to bound the run's size).
        max_parallel: GPU tasks at once, at most (1 to 16).
        verifier_threshold: The lesion verifier's operating point: the least probability of being a lesion a candidate needs to be reported, 0..1 (below 0: the model's own; lower finds more lesions and more false ones).
    """  # noqa: E501  (KFP makes each Args line a parameter description: one line each)
    record = _bookkeeping(record_run(results_uri=results_uri, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "Record run")
    with dsl.ExitHandler(record, name="cohort"):
        listing = _bookkeeping(
            list_studies(
                studies_uri=studies_uri,
                studies_csv=studies_csv,
                model_uri=model_uri,
                results_uri=results_uri,
                prompts=prompts,
                rules=rules,
                resample=resample,
                min_volume_ml=min_volume_ml,
                force=force,
                maps=maps,
                batch_size=batch_size,
                max_parallel=max_parallel,
                verifier_threshold=verifier_threshold,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ),
            "List studies",
        )
        studies = cohort_studies(
            lanes=listing.outputs["Output"],
            model_uri=model_uri,
            prompts=prompts,
            rules=rules,
            resample=resample,
            min_volume_ml=min_volume_ml,
            results_uri=results_uri,
            maps=maps,
            verifier_threshold=verifier_threshold,
        )
        studies.set_display_name("Studies")
        report = cohort_report(
            results_uri=results_uri, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, rules=rules, resample=resample
        )
        # Diagnosing failed studies re-reads them (see diffugts.runners.cohort.diagnose): room for one CT.
        cpu_stage(report, "Cohort report", cpu="2", memory="8G")
        report.set_caching_options(False).set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
        report.after(studies).ignore_upstream_failure()
