"""Kubeflow component: reporting (study + lesions [+ attention, synthesis] -> report folder).

The human report and the numbers also go to KFP Markdown / HTML / Metrics artifacts, so the
Kubeflow UI shows them on the run page. Upload and Prometheus settings come from the
environment (``DIFFUGTS_BUCKET`` and S3 credentials, ``DIFFUGTS_PUSHGATEWAY_URL``).
"""

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report(
    study: dsl.Input[dsl.Dataset],
    lesions: dsl.Input[dsl.Dataset],
    report_folder: dsl.Output[dsl.Dataset],
    summary: dsl.Output[dsl.Markdown],
    html: dsl.Output[dsl.HTML],
    metrics: dsl.Output[dsl.Metrics],
    attention: dsl.Input[dsl.Dataset] = None,
    synthesis: dsl.Input[dsl.Dataset] = None,
    upload: bool = False,
    upload_uri: str = "",
    max_pictures: int = 12,
):
    """DICOM SEG + SR, the human report with pictures, KFP metrics, results upload.

    Args:
        upload: Publish the report folder to the results bucket under the study's UID.
        upload_uri: Base s3:// URI for the upload; empty = s3://$DIFFUGTS_BUCKET.
        max_pictures: Lesions pictured in the report, largest first.
    """
    import json
    import shutil

    from diffugts.stages.report import make_report
    from diffugts.utils.logs import component_step

    with component_step():  # highdicom logs UIDs: filtered as in the CLI
        result = make_report(
            study.path,
            lesions.path,
            report_folder.path,
            attention_dir=attention.path if attention is not None else None,
            synthesis_dir=synthesis.path if synthesis is not None else None,
            upload=upload_uri if upload else None,
            max_lesion_pictures=max_pictures,
        )
    # The UI's Markdown view cannot show the folder's PNGs: summary.md has the tables only;
    # the HTML view has everything.
    shutil.copyfile(f"{report_folder.path}/summary.md", summary.path)
    shutil.copyfile(f"{report_folder.path}/report.html", html.path)
    with open(f"{report_folder.path}/metrics.json") as f:
        for name, value in json.load(f).items():
            metrics.log_metric(name, value)
    report_folder.metadata.update(
        {
            "lesions": len(result["lesions"]),
            "modality": result["study"]["modality"],
            "uploaded_to": (result.get("upload") or {}).get("uri", ""),
        }
    )
