"""The fused study pipeline: the staged study pipeline with its three GPU stages in one task.

    ingestion -> attention maps + pseudo-healthy synthesis + residual refinement (one GPU task) -> report

Same inputs, same artifacts (attention, synthesis, lesions, report), three pods instead of
five: per study the GPU image starts, torch and MONAI are imported and the model package is
read once instead of three times. The cohort pipeline runs studies this way; the staged
pipeline (pipelines/study.py) shows and caches each stage on its own, for single studies and
for re-running one stage with other settings.
"""

from kfp import dsl

from components.ingest import ingest
from components.report import report
from components.segment import segment
from diffugts.config import DEFAULT_MIN_VOLUME_ML, PIPELINE_MODEL_THRESHOLD, MapMode
from pipelines.resources import cpu_stage, fingerprints, gpu_stage


@dsl.pipeline(
    name="diffugts-study-fused",
    description="Zero-shot, open-vocabulary tumor segmentation of one CT/MR study, the model stages in one "
    "GPU task (DICOM folder, zip or s3:// prefix).",
)
def study_fused_pipeline(
    input_uri: str,
    model_uri: str,
    prompts: list = ["liver tumor", "kidney tumor", "pancreas tumor"],  # noqa: B006  (KFP compiles it; never mutated)
    rules: str = "default",
    resample: bool = False,
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
    upload: bool = False,
    results_uri: str = "",
    maps: str = MapMode.AOVA.value,
    verifier_threshold: float = PIPELINE_MODEL_THRESHOLD,
) -> dsl.Dataset:
    """Segment one study.

    Args:
        input_uri: The study: a DICOM folder, a .zip, or s3://bucket/prefix.
        model_uri: The model package: a folder or s3:// prefix (manifest + safetensors).
        prompts: What to segment, free text, e.g. ["liver tumor", "pancreatic cyst"].
        rules: Series selection rules: "default", "permissive" (single slices, any orientation) or a JSON document.
        resample: Resample gantry-tilted or oblique series instead of rejecting them.
        min_volume_ml: Lesions smaller than this (mL) are dropped.
        upload: Publish the results (DICOM SEG/SR, report) to the results bucket under the study UID.
        results_uri: Base s3:// URI for results; empty = s3://$DIFFUGTS_BUCKET.
        maps: Attention maps from the trained AOVA head ("aova") or, for 2D diffusers models, the backbone's own cross-attention ("training-free").
        verifier_threshold: The lesion verifier's operating point: the least probability of being a lesion a candidate needs to be reported, 0..1 (below 0: the model's own; lower finds more lesions and more false ones).
    """  # noqa: E501  (KFP makes each Args line a parameter description: one line each)
    keys = fingerprints(input_uri, model_uri)
    ingest_task = cpu_stage(
        ingest(input_uri=input_uri, study_sha256=keys.outputs["study_sha256"], rules=rules, resample=resample),
        "DICOM ingestion",
    )
    model_task = gpu_stage(
        segment(
            study=ingest_task.outputs["study"],
            model_uri=model_uri,
            model_sha256=keys.outputs["model_sha256"],
            prompts=prompts,
            maps=maps,
            min_volume_ml=min_volume_ml,
            verifier_threshold=verifier_threshold,
        ),
        "Attention, synthesis, refinement",
    )
    report_task = cpu_stage(
        report(
            study=ingest_task.outputs["study"],
            lesions=model_task.outputs["lesions"],
            attention=model_task.outputs["attention"],
            synthesis=model_task.outputs["synthesis"],
            upload=upload,
            upload_uri=results_uri,
        ),
        "Report",
    )
    return report_task.outputs["report_folder"]
