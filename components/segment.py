"""Kubeflow component: attention maps, pseudo-healthy synthesis and residual refinement in one
GPU task (the fused study pipeline's middle; the three artifacts are the staged pipeline's).

One pod instead of three: the image is pulled, torch and MONAI are imported and the model
package is read (from S3 on a cluster) once per study, and the GPU is scheduled once.
"""

from kfp import dsl

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def segment(
    study: dsl.Input[dsl.Dataset],
    model_uri: str,
    model_sha256: str,
    prompts: list,
    attention: dsl.Output[dsl.Dataset],
    synthesis: dsl.Output[dsl.Dataset],
    lesions: dsl.Output[dsl.Dataset],
    min_volume_ml: float = 0.1,
    seed: int = 0,
    maps: str = "aova",
    verifier_threshold: float = -1.0,
):
    """Per-prompt attention maps, the pseudo-healthy study, refined masks and measured lesions.

    Args:
        model_uri: Model package folder or s3:// prefix (S3 settings from the environment).
        model_sha256: The model's fingerprint (components/fingerprint.py). Not read here: it is in
            the task's cache key, so a model replaced under the same URI is not served from the cache.
        prompts: What to segment, free text, e.g. ["liver tumor", "pancreatic cyst"].
        min_volume_ml: Lesions smaller than this are dropped.
        seed: Seed of the attention features' noise (the same seed gives the same maps).
        maps: "aova" (the package's trained head) or "training-free" (the backbone's own text
            cross-attention; 2D diffusers packages only).
        verifier_threshold: The lesion verifier's operating point, 0..1 (below 0: the model's own).
    """
    import sys

    from diffugts.config import pipeline_threshold
    from diffugts.errors import DiffugtsError
    from diffugts.runners.segment import model_stages

    try:
        result = model_stages(
            study.path,
            model_uri,
            [str(p) for p in prompts],
            attention.path,
            synthesis.path,
            lesions.path,
            min_volume_ml=min_volume_ml,
            seed=seed,
            maps=maps,
            verifier_threshold=pipeline_threshold(verifier_threshold),
        )
    except DiffugtsError as err:
        print(f"diffugts: error: {err}", file=sys.stderr)
        sys.exit(2)
    found = result["refine"]["lesions"]
    attention.metadata.update(
        {
            "model": result["attend"]["model"]["name"],
            "device": result["attend"]["device"],
            "scores": {t["prompt"]["text"]: t["score"] for t in result["attend"]["targets"]},
        }
    )
    synthesis.metadata.update(
        {
            "nothing_to_inpaint": result["synthesize"]["nothing_to_inpaint"],
            "inpainted_ml": result["synthesize"]["mask"]["dilated_ml"],
        }
    )
    lesions.metadata.update(
        {
            "lesions": len(found),
            "volume_ml": round(sum(x["volume_ml"] for x in found), 3),
            "timings_s": result["timings_s"],
        }
    )
