"""Kubeflow components of the cohort pipeline: list studies, mark one done, the cohort report,
the run's record. Thin adapters over :mod:`diffugts.cohort` (see there for the layout under
``results_uri``). S3 and Pushgateway settings come from the environment.
"""

from kfp import dsl

from components.images import CPU_IMAGE


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
) -> list:
    """The studies to process: every input without a ``done`` marker for this model and these
    parameters (all of them with ``force``). Each item: key, input_uri, model_sha256, params_hash.
    """
    import sys

    from diffugts.cohort import plan_run
    from diffugts.errors import DiffugtsError

    try:
        listing = plan_run(results_uri, run_id, studies_uri=studies_uri, studies_csv=studies_csv,
                           model_uri=model_uri, prompts=[str(p) for p in prompts], rules=rules, resample=resample,
                           min_volume_ml=min_volume_ml, force=force, maps=maps)
    except DiffugtsError as err:
        print(f"diffugts: error: {err}", file=sys.stderr)
        sys.exit(2)
    with open(summary.path, "w") as f:
        f.write(f"# Studies\n\n{len(listing['pending']) + len(listing['skipped'])} listed: "
                f"{len(listing['pending'])} to process, {len(listing['skipped'])} skipped (done before with "
                f"model {listing['model_sha256'][:12]} and these parameters).\n")
    return listing["pending"]


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def mark_done(
    report: dsl.Input[dsl.Dataset],
    key: str,
    model_sha256: str,
    params_hash: str,
    results_uri: str,
    run_id: str,
):
    """Publish a finished study's report to ``<results_uri>/<StudyInstanceUID>/report`` (the
    report stage's upload layout), then write its ``done`` marker."""
    import sys

    from diffugts.cohort import mark_done as run_mark_done
    from diffugts.errors import DiffugtsError

    try:
        marker = run_mark_done(report.path, results_uri, key, model_sha256=model_sha256, params_hash=params_hash,
                               run=run_id)
    except DiffugtsError as err:
        print(f"diffugts: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"study {marker['study_key']} done: {marker['result']}")


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

    from diffugts.cohort import collect_run, run_markdown
    from diffugts.errors import DiffugtsError
    from diffugts.logs import install

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
    from diffugts.cohort import finish_run

    record = finish_run(results_uri, run_id, status.state, status.error_message or "")
    print(f"cohort run {run_id}: {record['state']}, {record['done']} done, {record['failed']} failed, "
          f"{record['skipped']} skipped")
