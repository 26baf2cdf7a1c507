"""The zero-shot protocol on real datasets, on the cluster (docs/datasets.md):

    train_aova_on_datasets (GPU) -> train_refine_on_datasets (GPU) -> evaluate_on_datasets (GPU)

The split file (``protocol``: a shipped name such as ``paper-protocol`` or a path under the
data volume) says which datasets train the heads (their seen lesion types only) and which are
evaluated; the datasets sit on a PersistentVolumeClaim mounted at ``/data`` (their licences
keep them off shared buckets; a volume is read at disk speed). The trained package and the
evaluation are the run's artifacts (KFP's object store).

Nothing is cached: the datasets on the volume and the package behind ``model_uri`` can change
under the same parameters, and a retried training task resumes from its checkpoint on the
volume instead.
"""

from kfp import dsl, kubernetes

from components.protocol import evaluate_on_datasets, train_aova_on_datasets, train_refine_on_datasets
from diffugts.config import DEFAULT_SEED
from pipelines.resources import gpu_stage

DATA_MOUNT = "/data"


def _on_data(task: dsl.PipelineTask, pvc: str, name: str) -> dsl.PipelineTask:
    # Real CT volumes and their features: more memory than one study needs.
    gpu_stage(task, name, memory="64G")
    kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=DATA_MOUNT)
    return task.set_caching_options(False)


@dsl.pipeline(
    name="diffugts-protocol",
    description="Train the anomaly-aware heads on the seen tumour types of real datasets (MSD, KiTS23, DICOM + SEG) "
    "and evaluate seen and unseen types zero-shot, the paper's figures beside ours.",
)
def protocol_pipeline(
    model_uri: str = "s3://diffugts/models/maisi-imported/",
    protocol: str = "paper-protocol",
    data_pvc: str = "diffugts-datasets",
    data_root: str = DATA_MOUNT,
    aova_steps: int = 1200,
    refine_steps: int = 1200,
    synthesis_steps: int = 10,
    randomised_cases: int = 20,
    fusion_recall: float = 0.85,
    seed: int = DEFAULT_SEED,
    max_cases: int = 0,
    prompt: str = "{organ} tumor",
) -> dsl.Dataset:
    """Train and evaluate by the split file; returns the evaluation (evaluation.json + .md).

    Args:
        model_uri: A package with the backbone (e.g. from `diffugts models import-maisi`), s3:// prefix or folder.
        protocol: The split file: "paper-protocol" (shipped) or a path under data_root.
        data_pvc: The PersistentVolumeClaim holding the datasets (mounted read-write at /data: checkpoints go there).
        data_root: Where the split file's dataset paths start; /data on the cluster.
        aova_steps: Training steps of the AOVA head.
        refine_steps: Training steps of the refinement head.
        synthesis_steps: Denoising steps of the pseudo-healthy synthesis while preparing refinement examples.
        randomised_cases: Copies of seen cases with random per-tissue intensities (modality-robust grounding).
        fusion_recall: Fuse the coarse map with the organ-relative deviation at this voxel recall (0: no fusion).
        seed: Training seed.
        max_cases: At most this many training cases per dataset (0: all; the training loops hold every case in memory).
        prompt: Evaluation prompt template; {organ} is each lesion's host organ.
    """
    aova = _on_data(
        train_aova_on_datasets(
            model_uri=model_uri,
            protocol=protocol,
            data_root=data_root,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            steps=aova_steps,
            seed=seed,
            randomised_cases=randomised_cases,
            fusion_recall=fusion_recall,
            max_cases=max_cases,
        ),
        data_pvc,
        "Train AOVA head (seen types)",
    )
    refine = _on_data(
        train_refine_on_datasets(
            aova=aova.outputs["model"],
            protocol=protocol,
            data_root=data_root,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            steps=refine_steps,
            synthesis_steps=synthesis_steps,
            seed=seed,
            max_cases=max_cases,
        ),
        data_pvc,
        "Train refinement head (seen types)",
    )
    evaluation = _on_data(
        evaluate_on_datasets(model=refine.outputs["model"], protocol=protocol, data_root=data_root, prompt=prompt),
        data_pvc,
        "Evaluate seen / unseen",
    )
    return evaluation.outputs["evaluation"]
