"""Kubernetes settings of the pipeline's tasks: resources, GPU scheduling, credentials.

GPU stages ask for one `nvidia.com/gpu` with a node selector and toleration (kfp-kubernetes);
S3 credentials come from the Kubernetes secret `diffugts-s3` and the endpoint / bucket /
Pushgateway from the ConfigMap `diffugts-config` (see manifests/). Every task runs non-root
with an emptyDir scratch at /tmp and the pod labels its NetworkPolicies select.
kfp.local ignores all of this, so `make run` works offline.
"""

from kfp import dsl, kubernetes

from components.fingerprint import fingerprint

S3_SECRET = "diffugts-s3"
# Every task runs as the images' user (images/*/Dockerfile), never root; current KFP adds
# allowPrivilegeEscalation=false, drop ALL and seccomp RuntimeDefault to each task container.
RUN_AS = 10001
# Scratch for zip extraction and S3 mirrors (TMPDIR): an emptyDir, so the image's file
# system is only read. Bounded: a study past this is evicted, not filling the node's disk.
SCRATCH = ("scratch", "/tmp", "40Gi")
# The labels on every task's pod (not on KFP's driver pods), each for a NetworkPolicy:
# - part-of: the kubeflow overlay's default-deny-ingress selects our pods by it (a profile
#   namespace also holds notebooks and model servers whose ingress is not ours to cut); the
#   Pushgateway and the nightly submitter carry it too.
# - diffugts.io/task: only the pods that run our tasks (they parse untrusted DICOM); the
#   egress policy manifests/base/networkpolicies.yaml `pipeline-task-egress` selects them.
POD_LABEL = ("app.kubernetes.io/part-of", "diffugts")
TASK_LABEL = ("diffugts.io/task", "true")
POD_LABELS = dict((POD_LABEL, TASK_LABEL))
CONFIG_MAP = "diffugts-config"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _common(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    task.set_display_name(name)
    # These pods parse untrusted DICOM: the same hardening as the other manifests.
    kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS, run_as_non_root=True)
    kubernetes.empty_dir_mount(task, volume_name=SCRATCH[0], mount_path=SCRATCH[1], size_limit=SCRATCH[2])
    for key, value in POD_LABELS.items():
        kubernetes.add_pod_label(task, label_key=key, label_value=value)
    kubernetes.use_secret_as_env(
        task,
        secret_name=S3_SECRET,
        secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=CONFIG_MAP,
        config_map_key_to_env={
            "DIFFUGTS_S3_ENDPOINT": "DIFFUGTS_S3_ENDPOINT",
            "DIFFUGTS_BUCKET": "DIFFUGTS_BUCKET",
            "DIFFUGTS_PUSHGATEWAY_URL": "DIFFUGTS_PUSHGATEWAY_URL",
        },
    )
    return task


def cpu_stage(task: dsl.PipelineTask, name: str, cpu: str = "2", memory: str = "8G") -> dsl.PipelineTask:
    task.set_cpu_request("1").set_cpu_limit(cpu).set_memory_request("2G").set_memory_limit(memory)
    return _common(task, name)


def gpu_stage(task: dsl.PipelineTask, name: str, memory: str = "32G") -> dsl.PipelineTask:
    task.set_cpu_request("4").set_cpu_limit("8").set_memory_request("16G").set_memory_limit(memory)
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    return _common(task, name)


def fingerprints(input_uri, model_uri) -> dsl.PipelineTask:
    """The uncached step whose outputs (study_sha256, model_sha256) go into the cache keys of
    the stages that read the study or the model (components/fingerprint.py)."""
    task = cpu_stage(fingerprint(input_uri=input_uri, model_uri=model_uri), "Fingerprints", cpu="1", memory="2G")
    return task.set_caching_options(False)
