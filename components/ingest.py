"""Kubeflow component: DICOM ingestion (folder, zip or s3:// prefix -> study artifact)."""

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(
    input_uri: str,
    study_sha256: str,
    study: dsl.Output[dsl.Dataset],
    summary: dsl.Output[dsl.Markdown],
    rules: str = "default",
    resample: bool = False,
):
    """Select one CT/MR series with the rules, validate its geometry, write the study artifact.

    Args:
        input_uri: DICOM folder, .zip, or s3://bucket/prefix (S3 settings from the environment).
        study_sha256: The study's fingerprint (components/fingerprint.py). Not read here: it is in
            the task's cache key, so a study re-exported under the same URI is not served from the cache.
        rules: "default", "permissive", or a JSON rules document.
        resample: Resample gantry-tilted / oblique series instead of rejecting them.
    """
    from diffugts.stages.ingest import ingest as run_ingest
    from diffugts.stages.ingest.summary import selection_markdown
    from diffugts.utils.logs import component_step

    # No header text, UIDs or input folder names in the task's log (component_step).
    with component_step(input_uri):
        result = run_ingest(input_uri, study.path, rules=rules, resample_grid=resample, show_progress=False)
    series = result.series
    study.metadata.update(
        {
            "modality": series["modality"],
            "series": series["series_label"],
            "size_ijk": series["volume"]["size_ijk"],
            "spacing_mm": series["volume"]["spacing_mm"],
        }
    )
    with open(summary.path, "w") as f:
        f.write(selection_markdown(series))
