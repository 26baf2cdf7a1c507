"""The study pipeline: one DICOM study in, results out.

Stages land here as they are built: ingestion -> attention maps -> pseudo-healthy synthesis
-> residual refinement -> reporting.
"""

from kfp import dsl

from components.ingest import ingest


@dsl.pipeline(
    name="diffugts-study",
    description="Zero-shot tumor segmentation of one CT/MR study (DICOM folder, zip or s3:// prefix).",
)
def study_pipeline(
    input_uri: str,
    rules: str = "default",
    resample: bool = False,
) -> dsl.Dataset:
    """Segment one study.

    Args:
        input_uri: The study: a DICOM folder, a .zip, or s3://bucket/prefix.
        rules: Series selection rules: "default", "permissive" (single slices, any orientation) or a JSON document.
        resample: Resample gantry-tilted or oblique series instead of rejecting them.
    """
    ingest_task = ingest(input_uri=input_uri, rules=rules, resample=resample)
    ingest_task.set_display_name("DICOM ingestion")
    ingest_task.set_cpu_limit("2").set_memory_limit("8G")
    return ingest_task.outputs["study"]
