"""Kubeflow component: anomaly-aware open-vocabulary attention maps (GPU stage)."""

from kfp import dsl

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def attend(
    study: dsl.Input[dsl.Dataset],
    model_uri: str,
    model_sha256: str,
    prompts: list,
    attention: dsl.Output[dsl.Dataset],
    seed: int = 0,
    maps: str = "aova",
):
    """Per-prompt anomaly probability maps and coarse masks on the study grid.

    Args:
        model_uri: Model package folder or s3:// prefix (S3 settings from the environment).
        model_sha256: The model's fingerprint (components/fingerprint.py). Not read here: it is in
            the task's cache key, so a model replaced under the same URI is not served from the cache.
        prompts: What to segment, free text, e.g. ["liver tumor", "pancreatic cyst"].
        seed: Seed of the denoiser-feature noise (the same seed gives the same maps).
        maps: "aova" (the package's trained head) or "training-free" (the backbone's own text
            cross-attention; 2D diffusers packages only).
    """
    import sys

    from diffugts.errors import DiffugtsError
    from diffugts.stages.attend import attend as run_attend

    try:
        summary = run_attend(study.path, model_uri, [str(p) for p in prompts], attention.path, seed=seed, maps=maps)
    except DiffugtsError as err:
        print(f"diffugts: error: {err}", file=sys.stderr)
        sys.exit(2)
    attention.metadata.update(
        {
            "model": summary["model"]["name"],
            "maps": summary["maps"],
            "device": summary["device"],
            "scores": {t["prompt"]["text"]: t["score"] for t in summary["targets"]},
        }
    )
