"""Kubeflow component: residual refinement -> refined masks and lesion instances."""

from kfp import dsl

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def refine(
    study: dsl.Input[dsl.Dataset],
    attention: dsl.Input[dsl.Dataset],
    synthesis: dsl.Input[dsl.Dataset],
    model_uri: str,
    model_sha256: str,
    lesions: dsl.Output[dsl.Dataset],
    min_volume_ml: float = 0.1,
    verifier_threshold: float = -1.0,
):
    """Refine the coarse masks with the pseudo-healthy residuals; split into measured lesions.

    Args:
        model_uri: Model package folder or s3:// prefix (S3 settings from the environment).
        model_sha256: The model's fingerprint (components/fingerprint.py). Not read here: it is in
            the task's cache key, so a model replaced under the same URI is not served from the cache.
        min_volume_ml: Lesions smaller than this are dropped.
        verifier_threshold: The lesion verifier's operating point, 0..1 (below 0: the model's own).
    """
    import sys

    from diffugts.config import pipeline_threshold
    from diffugts.errors import DiffugtsError
    from diffugts.stages.refine import refine as run_refine

    try:
        summary = run_refine(
            study.path,
            attention.path,
            synthesis.path,
            model_uri,
            lesions.path,
            min_volume_ml=min_volume_ml,
            verifier_threshold=pipeline_threshold(verifier_threshold),
        )
    except DiffugtsError as err:
        print(f"diffugts: error: {err}", file=sys.stderr)
        sys.exit(2)
    lesions.metadata.update(
        {
            "lesions": len(summary["lesions"]),
            "volume_ml": round(sum(les["volume_ml"] for les in summary["lesions"]), 3),
        }
    )
