"""Kubeflow component: pseudo-healthy synthesis (study + attention artifacts -> synthesis artifact).

Runs on the GPU image; the pipeline asks for the GPU (``set_accelerator_type`` /
``set_accelerator_limit``), this adapter only calls :func:`diffugts.stages.synthesize.synthesize`.
Defaults match :class:`diffugts.config.SynthesisParams` (tested).
"""

from kfp import dsl

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def synthesize(
    study: dsl.Input[dsl.Dataset],
    attention: dsl.Input[dsl.Dataset],
    model_uri: str,
    model_sha256: str,
    synthesis: dsl.Output[dsl.Dataset],
    target: int = -1,
    dilation_mm: float = 8.0,
    strength: float = 0.8,
    steps: int = 10,
    jumps: int = 0,
    seed: int = 0,
    context_mm: float = 48.0,
    feather_mm: float = 4.0,
    harmonise: bool = True,
):
    """Inpaint the coarse attention mask with the frozen backbone; outside the dilated mask the
    output equals the input exactly.

    Args:
        model_uri: Model package folder or s3:// prefix (S3 settings from the environment).
        model_sha256: The model's fingerprint (components/fingerprint.py). Not read here: it is in
            the task's cache key, so a model replaced under the same URI is not served from the cache.
        target: Attention target index to inpaint; -1 = the union of all targets' coarse masks.
        dilation_mm: Grow the coarse mask by this many mm before inpainting.
        strength: Starting noise level as a fraction of the schedule, in (0, 1].
        steps: Denoising steps.
        jumps: RePaint resampling jumps per step (each costs one more denoiser pass per step).
        seed: Noise seed: the same seed gives the same output.
        context_mm: Tissue around the mask the denoiser sees.
        feather_mm: Width of the paste-back ramp inside the dilated mask's border (0 = hard edge).
        harmonise: Shift the synthesis by the median (input - synthesis) of the ring around the mask.
    """
    import sys

    from diffugts.config import SynthesisParams
    from diffugts.errors import DiffugtsError
    from diffugts.stages.synthesize import synthesize as run_synthesis

    params = SynthesisParams(
        dilation_mm=dilation_mm,
        strength=strength,
        steps=steps,
        jumps=jumps,
        seed=seed,
        context_mm=context_mm,
        feather_mm=feather_mm,
        harmonise=harmonise,
    )
    try:
        summary = run_synthesis(
            study.path,
            model_uri,
            synthesis.path,
            attention=attention.path,
            target=None if target < 0 else target,
            params=params,
            show_progress=False,
        )
    except DiffugtsError as err:
        print(f"diffugts: error: {err}", file=sys.stderr)
        sys.exit(2)
    synthesis.metadata.update(
        {
            "nothing_to_inpaint": summary["nothing_to_inpaint"],
            "inpainted_ml": summary["mask"]["dilated_ml"],
            "model": summary["model"]["name"],
            "device": summary["device"] or "none",
        }
    )
