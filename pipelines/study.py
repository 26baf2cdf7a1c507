"""The study pipeline: one DICOM study in, masks, lesions, DICOM SEG/SR and a report out.

ingestion -> attention maps (GPU) -> pseudo-healthy synthesis (GPU) -> residual refinement (GPU) -> report
"""

from kfp import dsl

from components.attend import attend
from components.ingest import ingest
from components.refine import refine
from components.report import report
from components.synthesize import synthesize
from diffugts.config import DEFAULT_MIN_VOLUME_ML, PIPELINE_MODEL_THRESHOLD, MapMode
from pipelines.resources import cpu_stage, fingerprints, gpu_stage


@dsl.pipeline(
    name="diffugts-study",
    description="Zero-shot, open-vocabulary tumor segmentation of one CT/MR study (DICOM folder, zip or s3:// prefix).",
)
def study_pipeline(
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
    study_sha, model_sha = keys.outputs["study_sha256"], keys.outputs["model_sha256"]
    ingest_task = cpu_stage(
        ingest(input_uri=input_uri, study_sha256=study_sha, rules=rules, resample=resample), "DICOM ingestion"
    )
    attend_task = gpu_stage(
        attend(
            study=ingest_task.outputs["study"], model_uri=model_uri, model_sha256=model_sha, prompts=prompts, maps=maps
        ),
        "Attention maps",
    )
    synth_task = gpu_stage(
        synthesize(
            study=ingest_task.outputs["study"],
            attention=attend_task.outputs["attention"],
            model_uri=model_uri,
            model_sha256=model_sha,
        ),
        "Pseudo-healthy synthesis",
    )
    refine_task = gpu_stage(
        refine(
            study=ingest_task.outputs["study"],
            attention=attend_task.outputs["attention"],
            synthesis=synth_task.outputs["synthesis"],
            model_uri=model_uri,
            model_sha256=model_sha,
            min_volume_ml=min_volume_ml,
            verifier_threshold=verifier_threshold,
        ),
        "Residual refinement",
    )
    report_task = cpu_stage(
        report(
            study=ingest_task.outputs["study"],
            lesions=refine_task.outputs["lesions"],
            attention=attend_task.outputs["attention"],
            synthesis=synth_task.outputs["synthesis"],
            upload=upload,
            upload_uri=results_uri,
        ),
        "Report",
    )
    return report_task.outputs["report_folder"]
