"""Kubeflow components of the zero-shot protocol on real datasets: train the AOVA head, then
the refinement head, on the split file's training datasets (seen lesion types only), and
evaluate on its held-out and unseen datasets. Thin adapters over :mod:`diffugts.datasets.run`
and :mod:`diffugts.train.run`; the datasets are read from ``data_root`` (a mounted volume).
"""

from kfp import dsl

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_aova_on_datasets(
    model_uri: str,
    protocol: str,
    data_root: str,
    run_id: str,
    model: dsl.Output[dsl.Model],
    steps: int = 1200,
    dim: int = 64,
    seed: int = 0,
    randomised_cases: int = 20,
    fusion_recall: float = 0.85,
    checkpoints: bool = True,
    max_cases: int = 0,
):
    """Train the AOVA head of the package at ``model_uri`` (an imported backbone) on the split
    file's training datasets; write the package with the head to ``model``.

    Args:
        checkpoints: Save the head every 100 steps under <data_root>/.diffugts-checkpoints/<run id>/ and resume
            from there when the task is retried.
        max_cases: At most this many training cases per dataset (0: all).
    """
    from pathlib import Path

    import torch

    from diffugts.datasets.run import protocol_source, training_checkpoint
    from diffugts.train.run import train_aova_head
    from diffugts.utils.logs import component_step

    with component_step():
        source = protocol_source(protocol, data_root, show_progress=False, max_cases=max_cases or None)
        checkpoint = (
            training_checkpoint(
                Path(data_root) / ".diffugts-checkpoints" / run_id,
                "aova",
                model_uri,
                {"seed": seed, "steps": steps, "dim": dim, "randomised_cases": randomised_cases},
                source,
            )
            if checkpoints
            else None
        )
        pkg = train_aova_head(
            model_uri,
            Path(model.path),
            seed,
            0,
            steps,
            dim,
            None,
            show_progress=False,
            randomised_cases=randomised_cases,
            fusion_recall=fusion_recall or None,
            source=source,
            checkpoint=checkpoint,
            device="cuda" if torch.cuda.is_available() else None,
        )
        if checkpoint:
            checkpoint.remove()
    training = pkg.manifest["provenance"]["aova_training"]
    model.metadata.update(
        {
            "sha256": pkg.sha256,
            "held_out_seen_dice": training["held_out_seen_dice"],
            "datasets": [d["name"] for d in training["datasets"]["datasets"]],
        }
    )


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_refine_on_datasets(
    aova: dsl.Input[dsl.Model],
    protocol: str,
    data_root: str,
    run_id: str,
    model: dsl.Output[dsl.Model],
    steps: int = 1200,
    synthesis_steps: int = 10,
    seed: int = 0,
    checkpoints: bool = True,
    max_cases: int = 0,
):
    """Train the refinement head on the same training datasets (pseudo-healthy synthesis of every
    case on the GPU); write the finished package to ``model``."""
    from pathlib import Path

    import torch

    from diffugts.datasets.run import protocol_source, training_checkpoint
    from diffugts.train.run import train_refine_head
    from diffugts.utils.logs import component_step

    with component_step():
        source = protocol_source(protocol, data_root, show_progress=False, max_cases=max_cases or None)
        checkpoint = (
            training_checkpoint(
                Path(data_root) / ".diffugts-checkpoints" / run_id,
                "refine",
                aova.path,
                {"seed": seed, "steps": steps, "synthesis_steps": synthesis_steps},
                source,
            )
            if checkpoints
            else None
        )
        pkg = train_refine_head(
            aova.path,
            Path(model.path),
            seed,
            0,
            steps,
            synthesis_steps,
            show_progress=False,
            source=source,
            checkpoint=checkpoint,
            device="cuda" if torch.cuda.is_available() else None,
        )
        if checkpoint:
            checkpoint.remove()
    training = pkg.manifest["provenance"]["refine_training"]
    model.metadata.update({"sha256": pkg.sha256, "held_out_seen_dice": training["held_out_seen_dice"]})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate_on_datasets(
    model: dsl.Input[dsl.Model],
    protocol: str,
    data_root: str,
    evaluation: dsl.Output[dsl.Dataset],
    summary: dsl.Output[dsl.Markdown],
    metrics: dsl.Output[dsl.Metrics],
    prompt: str = "{organ} tumor",
):
    """Seen (held-out cases of the training datasets) and unseen Dice, NSD, detection and false
    lesions per dataset and lesion type, the paper's figures beside ours:
    evaluation.json + evaluation.md in ``evaluation``, the Markdown in the UI."""
    from pathlib import Path

    from diffugts.datasets.run import evaluate_protocol
    from diffugts.runners.evaluate import markdown, write
    from diffugts.utils.logs import component_step

    with component_step():
        result = evaluate_protocol(model.path, protocol, data_root, prompt_template=prompt, show_progress=False)
        write(result, Path(evaluation.path))
    with open(summary.path, "w") as f:
        f.write(markdown(result))
    for key, cells in result["by_dataset"]["dataset_split"].items():
        if "full" in cells:
            metrics.log_metric(f"dice {key}".replace(" / ", " "), cells["full"]["dice"])
