"""Kubeflow components of the cohort pipeline: list studies (in batches), segment a batch, the
cohort report, the run's record. Thin adapters over :mod:`diffugts.runners.cohort` (see there for the layout under
``results_uri``). S3 and Pushgateway settings come from the environment.
"""

from kfp import dsl

from components.images import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def list_studies(
    studies_uri: str,
    studies_csv: str,
    model_uri: str,
    results_uri: str,
    prompts: list,
    rules: str,
    resample: bool,
    min_volume_ml: float,
    force: bool,
    run_id: str,
    summary: dsl.Output[dsl.Markdown],
    maps: str = "aova",
    batch_size: int = 8,
    max_parallel: int = 4,
    verifier_threshold: float = -1.0,
) -> list:
    """The studies to process: every input without a ``done`` marker for this model and these
    parameters (all of them with ``force``), in batches of at least ``batch_size``, dealt into at
    most ``max_parallel`` lanes. Returns the lanes (lists of batch numbers); the batches' studies
    are in the run's listing.json under ``results_uri``.
    """
    import sys

    from diffugts.config import pipeline_threshold
    from diffugts.errors import DiffugtsError
    from diffugts.runners.cohort import plan_run

    try:
        listing = plan_run(
            results_uri,
            run_id,
            studies_uri=studies_uri,
            studies_csv=studies_csv,
            model_uri=model_uri,
            prompts=[str(p) for p in prompts],
            rules=rules,
            resample=resample,
            min_volume_ml=min_volume_ml,
            force=force,
            maps=maps,
            batch_size=batch_size,
            max_parallel=max_parallel,
            verifier_threshold=pipeline_threshold(verifier_threshold),
        )
    except DiffugtsError as err:
        print(f"diffugts: error: {err}", file=sys.stderr)
        sys.exit(2)
    with open(summary.path, "w") as f:
        f.write(
            f"# Studies\n\n{len(listing['pending']) + len(listing['skipped'])} listed: "
            f"{len(listing['pending'])} to process, {len(listing['skipped'])} skipped (done before with "
            f"model {listing['model_sha256'][:12]} and these parameters).\n\n"
            f"{len(listing['batches'])} batches of up to {listing['batch_size']} studies, "
            f"{len(listing['lanes'])} at a time.\n"
        )
    return listing["lanes"]


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def segment_batch(
    results_uri: str,
    run_id: str,
    batch: int,
    model_uri: str,
    prompts: list,
    rules: str,
    resample: bool,
    min_volume_ml: float,
    maps: str = "aova",
    verifier_threshold: float = -1.0,
):
    """One batch of the run's studies in one process, the model loaded once: per study ingestion,
    attention maps, synthesis, refinement, the report published to
    ``<results_uri>/<StudyInstanceUID>/report`` and its ``done`` marker. A study that fails is
    recorded with its reason and the batch goes on."""
    from diffugts.config import pipeline_threshold
    from diffugts.runners.batch import run_batch
    from diffugts.utils.logs import component_step

    # Ingestion and reporting of untrusted DICOM: no header text or UIDs in the task's log, and
    # a user-facing error as one line, exit 2 (component_step, as the study pipelines' steps).
    with component_step():
        counts = run_batch(
            results_uri,
            run_id,
            batch,
            model_uri=model_uri,
            prompts=[str(p) for p in prompts],
            rules=rules,
            resample=resample,
            min_volume_ml=min_volume_ml,
            maps=maps,
            verifier_threshold=pipeline_threshold(verifier_threshold),
        )
    print(
        f"batch {batch}: {counts['done']} done, {counts['failed']} failed, "
        f"{counts['already_done']} done before (a retry)"
    )


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def cohort_report(
    results_uri: str,
    run_id: str,
    rules: str,
    resample: bool,
    cohort: dsl.Output[dsl.Dataset],
    html: dsl.Output[dsl.HTML],
    summary: dsl.Output[dsl.Markdown],
    metrics: dsl.Output[dsl.Metrics],
):
    """The cohort report of this run (CSV + HTML, also copied to ``<results_uri>/cohort/<run>``),
    failed studies listed with the reason found by re-checking their ingestion."""
    import shutil
    import sys

    from diffugts.errors import DiffugtsError
    from diffugts.runners.cohort import collect_run, run_markdown
    from diffugts.utils.logs import install

    install()  # diagnosing failures re-reads DICOM: no header text or UIDs in this log

    try:
        result = collect_run(results_uri, run_id, cohort.path, rules=rules, resample=resample)
    except DiffugtsError as err:
        print(f"diffugts: error: {err}", file=sys.stderr)
        sys.exit(2)
    shutil.copyfile(f"{cohort.path}/cohort.html", html.path)
    with open(summary.path, "w") as f:
        f.write(run_markdown(result))
    for name in ("listed", "skipped", "processed", "done", "failed", "lesions"):
        metrics.log_metric(name, result[name])
    cohort.metadata.update({"report": result["report"], "done": result["done"], "failed": result["failed"]})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def record_run(results_uri: str, run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: write ``<results_uri>/_runs/cohort-<run>.json`` (final state, counts) and
    push the cohort gauges to the Pushgateway, if one is configured."""
    from diffugts.runners.cohort import finish_run

    record = finish_run(results_uri, run_id, status.state, status.error_message or "")
    print(
        f"cohort run {run_id}: {record['state']}, {record['done']} done, {record['failed']} failed, "
        f"{record['skipped']} skipped"
    )
