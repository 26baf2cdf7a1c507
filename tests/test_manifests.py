"""Checks on the Kubernetes manifests in ``manifests/``, as a cluster operator would read them.

Every kustomization is rendered with ``kubectl kustomize`` (offline, no cluster). The rendered
objects are then checked:

- core kinds against the Kubernetes OpenAPI schemas (PyPI ``kubernetes-validate``, strict: an
  unknown field is an error), for the oldest and the newest Kubernetes we support;
- the Argo CronWorkflow against hera's Argo models (unknown or misspelt fields are detected by
  a lossless round trip, since pydantic ignores extra keys);
- the KFP custom resources (ScheduledWorkflow, Pipeline, PipelineVersion) against JSON schemas
  written from their CRDs / Go types in kubeflow/pipelines;
- checkov (kubernetes, argo_workflows, dockerfile and secrets frameworks) once per session on
  everything rendered, with zero failures: each exception is a ``checkov.io/skipN`` annotation
  on the resource with its reason;
- security properties asserted directly (non-root, limits, read-only root, no ``latest``,
  no Secret with data in git, least-privilege RBAC, NetworkPolicies).

The validators live in ``.venv-lint`` (``requirements/lint.txt``; checkov's pins conflict with
the project's); a missing tool skips locally and fails when ``CI=true``.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
LINT_VENV = REPO / ".venv-lint"
NAMESPACE = "diffugts"

# Oldest and newest Kubernetes the manifests are validated against (schemas shipped by
# kubernetes-validate 1.37.0 cover 1.25..1.37). Every field used exists since 1.25.
K8S_VERSIONS = ("1.32.0", "1.37.0")

# Custom resources: kubernetes-validate has no schema for them; each kind is checked below.
CRD_KINDS = {"CronWorkflow", "ScheduledWorkflow", "Pipeline", "PipelineVersion"}

# Kinds whose objects carry a pod template, and where it is.
POD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}


# ----------------------------------------------------------------------------------- tools


def _missing(what: str) -> None:
    """Skip locally, fail in CI (CI=true), when a tool the checks need is not installed."""
    message = f"{what} is not installed (make lint-venv: requirements/lint.txt into .venv-lint)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; CI=true requires it")
    pytest.skip(message)


def _tool(name: str) -> str:
    for candidate in (LINT_VENV / "bin" / name, REPO / ".venv" / "bin" / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        _missing(name)
    return found


@functools.cache
def _lint_python(*modules: str) -> str:
    """The interpreter of .venv-lint, checked to import ``modules``."""
    python = LINT_VENV / "bin" / "python"
    if not python.is_file():
        _missing(f".venv-lint ({', '.join(modules)})")
    probe = subprocess.run([str(python), "-c", "import " + ", ".join(modules)], capture_output=True, text=True)
    if probe.returncode != 0:
        _missing(f"{', '.join(modules)} in .venv-lint")
    return str(python)


def _run_in_lint_venv(modules: tuple[str, ...], code: str, payload) -> dict:
    """Run ``code`` with the lint venv's Python: JSON ``payload`` on stdin, JSON on stdout."""
    python = _lint_python(*modules)
    proc = subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"validator crashed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------- rendering


def _kustomizations() -> list[str]:
    """Every kustomization under manifests/ (relative dirs), except manifests/secrets."""
    dirs = sorted(str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml"))
    return [d for d in dirs if d != "secrets"]


def _kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _missing("kubectl (for `kubectl kustomize`)")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _rendered_cached(target: str) -> tuple:
    return tuple(_kustomize(MANIFESTS / target))


def rendered(target: str) -> list[dict]:
    return [json.loads(json.dumps(doc)) for doc in _rendered_cached(target)]


def overlays() -> list[str]:
    return sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))


def all_rendered() -> list[tuple[str, dict]]:
    return [(target, doc) for target in _kustomizations() for doc in rendered(target)]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def _dig(doc: dict, path: tuple[str, ...]):
    for key in path:
        doc = doc[key]
    return doc


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(label, pod spec) of every pod these objects create, Argo templates included."""
    specs = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in POD_TEMPLATE_PATHS:
            specs.append((f"{kind}/{name}", _dig(doc, POD_TEMPLATE_PATHS[kind])))
        elif kind == "CronWorkflow":
            specs.extend(_argo_pod_specs(f"{kind}/{name}", doc["spec"]["workflowSpec"]))
    return specs


def _argo_pod_specs(label: str, wf_spec: dict) -> list[tuple[str, dict]]:
    """The pod Argo creates for each container template: workflow-level pod settings plus
    the template's own (template values win, as in Argo)."""
    specs = []
    for template in wf_spec.get("templates", []):
        if "container" not in template and "script" not in template:
            continue
        container = dict(template.get("container") or template.get("script"))
        container.setdefault("name", "main")
        spec = {
            "serviceAccountName": template.get("serviceAccountName") or wf_spec.get("serviceAccountName"),
            "securityContext": template.get("securityContext") or wf_spec.get("securityContext"),
            "containers": [container],
            "initContainers": template.get("initContainers", []),
            "volumes": wf_spec.get("volumes", []) + template.get("volumes", []),
            "restartPolicy": "Never",
        }
        for key in ("automountServiceAccountToken", "hostNetwork", "hostPID", "hostIPC"):
            if key in template or key in wf_spec:
                spec[key] = template.get(key, wf_spec.get(key))
        specs.append((f"{label}[{template['name']}]", spec))
    return specs


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def components_images() -> dict[str, str]:
    """Default image names in components/images.py (read, not imported: no env overrides)."""
    tree = ast.parse((REPO / "components" / "images.py").read_text())
    consts: dict[str, str] = {}
    images: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or not isinstance(node.targets[0], ast.Name):
            continue
        name, value = node.targets[0].id, node.value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            consts[name] = value.value
        elif isinstance(value, ast.Call) and len(value.args) == 2:  # os.environ.get(K, default)
            default = value.args[1]
            if isinstance(default, ast.JoinedStr):
                text = ""
                for part in default.values:
                    if isinstance(part, ast.Constant):
                        text += part.value
                    else:
                        text += consts[part.value.id]
                images[name] = text
            elif isinstance(default, ast.Constant):
                images[name] = default.value
    return images


# ------------------------------------------------------------------------------ rendering


def test_every_kustomization_renders_into_the_namespace():
    targets = _kustomizations()
    assert {
        "base",
        "overlays/standalone",
        "overlays/kubeflow",
        "base/pipelines",
        "base/pipelines/schedule-argo",
        "base/pipelines/schedule-kfp",
    } <= set(targets)
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PriorityClass",
        "StorageClass",
    }
    for target in targets:
        docs = rendered(target)
        if target != "base/pipelines":  # filled by `make compile`
            assert docs, f"{target} renders nothing"
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), (target, doc)
            if doc["kind"] not in cluster_scoped:
                assert doc["metadata"].get("namespace") == NAMESPACE, (target, doc["kind"], doc["metadata"]["name"])
            labels = doc["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "diffugts", (target, doc["kind"])


def test_overlays_cover_both_object_stores():
    assert {"standalone", "kubeflow"} <= set(overlays())
    standalone = rendered("overlays/standalone")
    one(standalone, "Deployment", "diffugts-minio")
    one(standalone, "PersistentVolumeClaim", "diffugts-minio-data")
    one(standalone, "Service", "diffugts-minio")
    kubeflow = rendered("overlays/kubeflow")
    assert not [d for d in kubeflow if "minio" in d["metadata"]["name"]], "no MinIO of ours"
    for overlay in overlays():
        docs = rendered(f"overlays/{overlay}")
        one(docs, "Deployment", "diffugts-pushgateway")
        one(docs, "Service", "diffugts-pushgateway")
        one(docs, "ServiceAccount", "diffugts-pipeline")
        one(docs, "ConfigMap", "diffugts-config")


def test_object_store_endpoint_per_overlay():
    standalone = rendered("overlays/standalone")
    config = one(standalone, "ConfigMap", "diffugts-config")["data"]
    # The endpoint names the MinIO Service of this overlay and its S3 port.
    match = re.fullmatch(
        r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", config["DIFFUGTS_S3_ENDPOINT"]
    )
    assert match, config["DIFFUGTS_S3_ENDPOINT"]
    service = one(standalone, "Service", match.group(1))
    assert match.group(2) == service["metadata"]["namespace"]
    assert int(match.group(3)) in [p["port"] for p in service["spec"]["ports"]]
    assert config["DIFFUGTS_BUCKET"] == "diffugts"

    kubeflow = one(rendered("overlays/kubeflow"), "ConfigMap", "diffugts-config")["data"]
    # Kubeflow's SeaweedFS, through its MinIO-compatible Service (port 9000 -> 8333).
    assert kubeflow["DIFFUGTS_S3_ENDPOINT"] == "http://minio-service.kubeflow.svc.cluster.local:9000"
    assert kubeflow["DIFFUGTS_BUCKET"] == "mlpipeline"

    for overlay in overlays():
        data = one(rendered(f"overlays/{overlay}"), "ConfigMap", "diffugts-config")["data"]
        assert set(data) == {"DIFFUGTS_S3_ENDPOINT", "DIFFUGTS_BUCKET", "DIFFUGTS_PUSHGATEWAY_URL"}
        push = re.fullmatch(
            r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", data["DIFFUGTS_PUSHGATEWAY_URL"]
        )
        assert push, data["DIFFUGTS_PUSHGATEWAY_URL"]
        service = one(rendered(f"overlays/{overlay}"), "Service", push.group(1))
        assert push.group(2) == NAMESPACE and int(push.group(3)) == service["spec"]["ports"][0]["port"]


def test_kubeflow_overlay_leaves_the_profile_namespace_alone():
    docs = rendered("overlays/kubeflow")
    assert not by_kind(docs, "Namespace"), "the Kubeflow Profile owns the namespace"
    assert by_kind(rendered("overlays/standalone"), "Namespace")
    # Nightly data under the namespace's own prefix of the shared bucket.
    cron = one(docs, "CronWorkflow", "diffugts-cohort-nightly")
    params = {p["name"]: p["value"] for p in cron["spec"]["workflowSpec"]["arguments"]["parameters"]}
    for key in ("studies_uri", "model_uri", "results_uri"):
        assert params[key].startswith("s3://mlpipeline/private/diffugts/"), params[key]


def test_services_select_pods_and_ports_exist():
    for overlay in overlays():
        docs = rendered(f"overlays/{overlay}")
        templates = [d["spec"]["template"] for d in by_kind(docs, "Deployment")]
        for service in by_kind(docs, "Service"):
            selector = service["spec"]["selector"]
            matching = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
            assert len(matching) == 1, (overlay, service["metadata"]["name"])
            port_names = {p.get("name") for c in matching[0]["spec"]["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in port_names, (overlay, port)
        for deployment in by_kind(docs, "Deployment"):
            selector = deployment["spec"]["selector"]["matchLabels"]
            assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_references_resolve():
    """Service accounts, ConfigMaps, PVCs and Secrets named by pods exist (Secrets: in the
    secrets kustomization, applied separately)."""
    secret_names = {d["metadata"]["name"] for d in _render_secrets_from_example()}
    for target in _kustomizations():
        docs = rendered(target)
        if not docs:
            continue
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for label, spec in pod_specs(docs):
            assert ("ServiceAccount", spec["serviceAccountName"]) in names, (target, label)
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert ("PersistentVolumeClaim", claim) in names, (target, label)
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in secret_names, (target, label)
            for container in containers(spec):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        assert ref["secretKeyRef"]["name"] in secret_names, (target, label)
                    if "configMapKeyRef" in ref:
                        assert ("ConfigMap", ref["configMapKeyRef"]["name"]) in names
        for binding in by_kind(docs, "RoleBinding"):
            assert ("Role", binding["roleRef"]["name"]) in names, (target, binding)
            for subject in binding["subjects"]:
                assert subject["kind"] == "ServiceAccount"
                assert ("ServiceAccount", subject["name"]) in names, (target, subject)
                assert subject["namespace"] == NAMESPACE


# ------------------------------------------------------------------- schema validation


_KUBERNETES_VALIDATE = """
import json, sys
import kubernetes_validate as kv
payload = json.load(sys.stdin)
result = {"errors": [], "no_schema": [], "validated": 0}
for label, doc in payload["docs"]:
    for version in payload["versions"]:
        try:
            kv.validate(doc, version, strict=True)
            result["validated"] += 1
        except kv.SchemaNotFoundError:
            result["no_schema"].append([label, doc["kind"], version])
        except kv.ValidationError as error:
            path = "/".join(str(p) for p in error.path)
            result["errors"].append(f"{label} @ {version}: {path}: {error.message}")
print(json.dumps(result))
"""


def _validate_core(docs: list[tuple[str, dict]]) -> dict:
    return _run_in_lint_venv(
        ("kubernetes_validate",),
        _KUBERNETES_VALIDATE,
        {"docs": docs, "versions": list(K8S_VERSIONS)},
    )


def test_core_kinds_validate_against_kubernetes_schemas():
    docs = [(f"{target}: {d['kind']}/{d['metadata']['name']}", d) for target, d in all_rendered()]
    docs += [(f"secrets: Secret/{d['metadata']['name']}", d) for d in _render_secrets_from_example()]
    result = _validate_core(docs)
    assert not result["errors"], "\n".join(result["errors"])
    # Nothing passes silently: only our custom resources lack a schema, and each of them is
    # validated by a test below.
    assert {kind for _, kind, _ in result["no_schema"]} <= CRD_KINDS, result["no_schema"]
    assert result["validated"] >= len(K8S_VERSIONS) * 10


def test_core_validation_rejects_a_broken_object():
    """The validator is strict: a misspelt field and a wrong type are each reported."""
    typo = one(rendered("overlays/standalone"), "Deployment", "diffugts-pushgateway")
    typo["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    wrong_type = one(rendered("overlays/standalone"), "Deployment", "diffugts-pushgateway")
    wrong_type["spec"]["replicas"] = "one"
    result = _validate_core([("typo", typo), ("wrong-type", wrong_type)])
    assert len(result["errors"]) == 2 * len(K8S_VERSIONS), result
    assert any("resource" in e for e in result["errors"] if e.startswith("typo"))


_HERA_CRONWORKFLOW = """
import json, sys
from hera.workflows.models import CronWorkflow
result = {}
for label, doc in json.load(sys.stdin):
    try:
        model = CronWorkflow.model_validate(doc)
    except Exception as error:  # pydantic.ValidationError
        result[label] = {"error": str(error)}
        continue
    result[label] = {"dump": model.model_dump(mode="json", by_alias=True, exclude_none=True)}
print(json.dumps(result))
"""


def _diff(expected, actual, path=""):
    """Paths where ``actual`` (the model's dump) lost or changed something of ``expected``."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in expected:
            if key not in actual:
                out.append(f"{path}/{key}: unknown to the model (typo?)")
            else:
                out += _diff(expected[key], actual[key], f"{path}/{key}")
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _diff(e, a, f"{path}[{i}]")]
    return [] if expected == actual else [f"{path}: {expected!r} -> {actual!r}"]


def _cronworkflows() -> list[tuple[str, dict]]:
    return [(f"{target}: {d['metadata']['name']}", d) for target, d in all_rendered() if d["kind"] == "CronWorkflow"]


def test_argo_cronworkflow_validates_with_hera():
    crons = _cronworkflows()
    assert len(crons) >= 3  # schedule-argo itself and both overlays
    result = _run_in_lint_venv(("hera",), _HERA_CRONWORKFLOW, crons)
    for label, doc in crons:
        assert "error" not in result[label], f"{label}: {result[label].get('error')}"
        assert doc["apiVersion"] == "argoproj.io/v1alpha1"
        lost = _diff(doc, result[label]["dump"])
        assert not lost, f"{label}:\n" + "\n".join(lost)


def test_hera_round_trip_catches_a_typo():
    label, doc = _cronworkflows()[0]
    doc["spec"]["concurencyPolicy"] = "Forbid"
    result = _run_in_lint_venv(("hera",), _HERA_CRONWORKFLOW, [[label, doc]])
    assert any("concurencyPolicy" in d for d in _diff(doc, result[label]["dump"]))


def test_cronworkflow_schedule_and_submission():
    images = components_images()
    for label, cron in _cronworkflows():
        spec = cron["spec"]
        assert spec["schedules"] and all(len(s.split()) == 5 for s in spec["schedules"]), label
        assert spec["timezone"]
        assert spec["concurrencyPolicy"] == "Forbid"
        assert 0 < spec["successfulJobsHistoryLimit"] <= 30
        assert 0 < spec["failedJobsHistoryLimit"] <= 30
        assert spec["startingDeadlineSeconds"] > 0
        assert not spec.get("suspend", False)
        wf = spec["workflowSpec"]
        assert wf["serviceAccountName"] == "diffugts-submitter"
        assert wf["activeDeadlineSeconds"] > 0
        params = {p["name"] for p in wf["arguments"]["parameters"]}
        assert {"studies_uri", "model_uri", "results_uri"} <= params
        (template,) = [t for t in wf["templates"] if t["name"] == wf["entrypoint"]]
        container = template["container"]
        assert container["image"] == images["CPU_IMAGE"]
        assert container["command"] == ["python", "-m", "pipelines.submit"]
        args = container["args"]
        assert args[args.index("--pipeline") + 1] == "diffugts-cohort"
        assert args[args.index("--service-account") + 1] == "{{workflow.parameters.service_account}}"
        defaults = {p["name"]: p["value"] for p in wf["arguments"]["parameters"]}
        assert defaults["service_account"] == "diffugts-pipeline"
        passed = [args[i + 1] for i, a in enumerate(args) if a == "--param"]
        assert sorted(p.split("=", 1)[0] for p in passed) == ["model_uri", "results_uri", "studies_uri"]
        for p in passed:
            name = p.split("=", 1)[0]
            assert p == f"{name}={{{{workflow.parameters.{name}}}}}"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/var/run/secrets/kubeflow/pipelines" in mounts  # KFP API token
        env = {e["name"]: e for e in container["env"]}
        assert env["KF_PIPELINES_SA_TOKEN_PATH"]["value"].startswith("/var/run/secrets/kubeflow/pipelines/")
        (token,) = [v for v in wf["volumes"] if v["name"] == "kfp-token"]
        assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
        # kfp.Client writes $HOME/.config/kfp/context.json: HOME must be on a writable volume,
        # the root filesystem is read-only.
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        home = env["HOME"]["value"]
        writable = {
            m["mountPath"]
            for m in container["volumeMounts"]
            if not m.get("readOnly") and any(v["name"] == m["name"] and "emptyDir" in v for v in wf["volumes"])
        }
        assert any(home == w or home.startswith(w.rstrip("/") + "/") for w in writable), (label, home)


# JSON schemas of the KFP custom resources, written from kubeflow/pipelines:
#   backend/src/crd/pkg/apis/scheduledworkflow/v1beta1/types.go (ScheduledWorkflow: `spec` and
#   `status` are tagged without omitempty, so the CRD generated from it requires both),
#   manifests/kustomize/base/crds/pipelines.kubeflow.org_{pipelines,pipelineversions}.yaml
#   (Pipeline, PipelineVersion; `displayName` on Pipeline as emitted by the kfp 2.17 SDK).
# additionalProperties is false throughout, stricter than the API server (which prunes unknown
# fields silently): a misspelt field is an error here.
_TIME = {"type": "string", "format": "date-time"}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {
            "type": "string",
            "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
            "maxLength": 253,
        }
    },
}
KFP_SCHEMAS = {
    "ScheduledWorkflow": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec", "status"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "kubeflow.org/v1beta1"},
            "kind": {"const": "ScheduledWorkflow"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "enabled": {"type": "boolean"},
                    "maxConcurrency": {"type": "integer", "minimum": 1, "maximum": 10},
                    "noCatchup": {"type": "boolean"},
                    "maxHistory": {"type": "integer", "minimum": 0, "maximum": 100},
                    "trigger": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "cronSchedule": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"startTime": _TIME, "endTime": _TIME, "cron": {"type": "string"}},
                            },
                            "periodicSchedule": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "startTime": _TIME,
                                    "endTime": _TIME,
                                    "intervalSecond": {"type": "integer"},
                                },
                            },
                        },
                    },
                    "workflow": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "parameters": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name", "value"],
                                    "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
                                },
                            },
                            "spec": {},
                        },
                    },
                    "experimentId": {"type": "string"},
                    "pipelineId": {"type": "string"},
                    "pipelineVersionId": {"type": "string"},
                    "pipelineName": {"type": "string"},
                    "serviceAccount": {"type": "string"},
                },
            },
            "status": {"type": "object"},
        },
    },
    "Pipeline": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "pipelines.kubeflow.org/v2beta1"},
            "kind": {"const": "Pipeline"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"description": {"type": "string"}, "displayName": {"type": "string"}},
            },
        },
    },
    "PipelineVersion": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "pipelines.kubeflow.org/v2beta1"},
            "kind": {"const": "PipelineVersion"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["pipelineSpec"],
                "additionalProperties": False,
                "properties": {
                    "codeSourceURL": {"type": "string"},
                    "description": {"type": "string"},
                    "displayName": {"type": "string"},
                    "pipelineName": {"type": "string"},
                    "pipelineSpec": {
                        "type": "object",
                        "required": ["pipelineInfo", "root"],
                    },
                    "pipelineSpecURI": {"type": "string"},
                    "platformSpec": {"type": "object"},
                },
            },
        },
    },
}

_JSONSCHEMA = """
import json, sys
import jsonschema
payload = json.load(sys.stdin)
errors = []
for label, doc in payload["docs"]:
    validator = jsonschema.Draft202012Validator(
        payload["schemas"][doc["kind"]], format_checker=jsonschema.FormatChecker())
    for error in validator.iter_errors(doc):
        errors.append(f"{label}: /{'/'.join(str(p) for p in error.path)}: {error.message}")
print(json.dumps(errors))
"""


def _validate_kfp(docs: list[tuple[str, dict]]) -> list[str]:
    return _run_in_lint_venv(("jsonschema",), _JSONSCHEMA, {"docs": docs, "schemas": KFP_SCHEMAS})


def _kfp_docs() -> list[tuple[str, dict]]:
    return [
        (f"{target}: {d['kind']}/{d['metadata']['name']}", d)
        for target, d in all_rendered()
        if d["kind"] in KFP_SCHEMAS
    ]


def test_kfp_custom_resources_match_their_schemas():
    docs = _kfp_docs()
    assert any(d["kind"] == "ScheduledWorkflow" for _, d in docs)
    errors = _validate_kfp(docs)
    assert not errors, "\n".join(errors)


def test_kfp_schema_rejects_a_misspelt_field():
    label, swf = [(lbl, d) for lbl, d in _kfp_docs() if d["kind"] == "ScheduledWorkflow"][0]
    swf["spec"]["maxConcurency"] = 1
    swf["spec"]["maxHistory"] = 1000
    assert len(_validate_kfp([(label, swf)])) == 2


def test_kfp_schema_accepts_what_the_sdk_compiles(tmp_path):
    """Self-check of the Pipeline/PipelineVersion schemas against the pinned kfp SDK's own
    Kubernetes-manifest output (the format `make compile` writes to manifests/base/pipelines)."""
    pytest.importorskip("kfp")
    source = tmp_path / "tiny_pipeline.py"
    source.write_text(
        textwrap.dedent("""
        from kfp import compiler, dsl
        from kfp.compiler import KubernetesManifestOptions

        @dsl.component(base_image="python:3.11")
        def echo(text: str) -> str:
            return text

        @dsl.pipeline(name="diffugts-cohort", description="schema self-check")
        def cohort(studies_uri: str = "s3://diffugts/studies/"):
            echo(text=studies_uri)

        if __name__ == "__main__":
            import sys
            compiler.Compiler().compile(
                cohort, sys.argv[1], kubernetes_manifest_format=True,
                kubernetes_manifest_options=KubernetesManifestOptions(
                    pipeline_name="diffugts-cohort", pipeline_version_name="diffugts-cohort-0-1-0",
                    namespace="diffugts", include_pipeline_manifest=True))
    """)
    )
    out = tmp_path / "cohort.yaml"
    subprocess.run([sys.executable, str(source), str(out)], check=True, timeout=120)
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert sorted(d["kind"] for d in docs) == ["Pipeline", "PipelineVersion"]
    assert not _validate_kfp([(d["kind"], d) for d in docs])


def test_compiled_pipelines_are_consistent():
    """What `make compile` puts into manifests/base/pipelines: each PipelineVersion belongs to a
    Pipeline rendered beside it, and the cohort pipeline takes the parameters the schedules set."""
    docs = rendered("base/pipelines")
    pipelines = {d["metadata"]["name"] for d in by_kind(docs, "Pipeline")}
    versions = by_kind(docs, "PipelineVersion")
    assert {d["kind"] for d in docs} <= {"Pipeline", "PipelineVersion"}
    for version in versions:
        assert version["spec"].get("pipelineName") in pipelines, version["metadata"]["name"]
    if "diffugts-cohort" in pipelines:
        cohort = [v for v in versions if v["spec"]["pipelineName"] == "diffugts-cohort"]
        assert cohort
        for version in cohort:
            inputs = version["spec"]["pipelineSpec"]["root"].get("inputDefinitions", {})
            assert {"studies_uri", "model_uri", "results_uri"} <= set(inputs.get("parameters", {}))


def test_scheduledworkflow_is_safe_to_apply():
    swf = one(rendered("base/pipelines/schedule-kfp"), "ScheduledWorkflow", "diffugts-cohort-nightly")
    spec = swf["spec"]
    # Enabled only with the ID of an uploaded pipeline: otherwise the controller has nothing
    # to start and would report an error every night. (No version ID: the newest version.)
    if spec.get("enabled"):
        assert spec.get("pipelineId")
    assert spec["maxConcurrency"] == 1  # no overlapping cohort runs
    assert spec["noCatchup"] is True
    fields = spec["trigger"]["cronSchedule"]["cron"].split()
    assert len(fields) == 6, "KFP cron expressions have a seconds field"
    assert spec["pipelineName"] == "diffugts-cohort"
    assert spec["serviceAccount"] == "diffugts-pipeline"
    swf_params = {p["name"] for p in spec["workflow"]["parameters"]}
    cron = one(rendered("base/pipelines/schedule-argo"), "CronWorkflow", "diffugts-cohort-nightly")
    cron_params = {p["name"] for p in cron["spec"]["workflowSpec"]["arguments"]["parameters"]}
    assert swf_params == {"studies_uri", "model_uri", "results_uri"} <= cron_params
    # Both fire at the same minute and hour (KFP: sec min hour ...; Argo: min hour ...).
    assert fields[1:3] == cron["spec"]["schedules"][0].split()[0:2]


def _scheduledworkflows() -> list[tuple[str, dict]]:
    return [(target, d) for target in _kustomizations() for d in by_kind(rendered(target), "ScheduledWorkflow")]


def test_scheduledworkflow_parameters_are_json_and_match_the_overlay():
    """KFP's scheduledworkflow controller JSON-decodes every parameter value into the run's
    parameters: a bare s3://... is not JSON, and no run is ever made. Each overlay's schedule
    uses that overlay's prefixes (the ones its CronWorkflow passes)."""
    swfs = _scheduledworkflows()
    assert {target for target, _ in swfs} >= {"base/pipelines/schedule-kfp", "overlays/kubeflow/schedule-kfp"}
    for target, swf in swfs:
        values = {}
        for param in swf["spec"]["workflow"]["parameters"]:
            try:
                values[param["name"]] = json.loads(param["value"])
            except json.JSONDecodeError:
                pytest.fail(f"{target}: {param['name']}: {param['value']!r} is not JSON")
        overlay = "overlays/kubeflow" if target.startswith("overlays/kubeflow") else "overlays/standalone"
        cron = one(rendered(overlay), "CronWorkflow", "diffugts-cohort-nightly")
        cron_values = {p["name"]: p["value"] for p in cron["spec"]["workflowSpec"]["arguments"]["parameters"]}
        assert values == {name: cron_values[name] for name in values}, target


def test_at_most_one_active_nightly_schedule():
    for target in _kustomizations():
        docs = rendered(target)
        active = [d for d in by_kind(docs, "CronWorkflow") if not d["spec"].get("suspend")]
        active += [d for d in by_kind(docs, "ScheduledWorkflow") if d["spec"].get("enabled")]
        assert len(active) <= 1, (target, [d["metadata"]["name"] for d in active])
    for overlay in overlays():
        docs = rendered(f"overlays/{overlay}")
        assert len(by_kind(docs, "CronWorkflow")) == 1, overlay  # the nightly job is active


# ----------------------------------------------------------------------- security


def test_every_container_is_hardened_and_bounded():
    specs = [(target, label, spec) for target in _kustomizations() for label, spec in pod_specs(rendered(target))]
    assert len(specs) >= 4
    for target, label, spec in specs:
        where = f"{target}: {label}"
        pod_sc = spec.get("securityContext") or {}
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
        for container in containers(spec):
            sc = container.get("securityContext") or {}
            cname = f"{where}/{container['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, cname
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid >= 1000, cname
            assert sc.get("allowPrivilegeEscalation") is False, cname
            assert not sc.get("privileged", False), cname
            assert sc.get("readOnlyRootFilesystem") is True, cname
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], cname
            assert not sc.get("capabilities", {}).get("add"), cname
            seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
            assert seccomp.get("type") == "RuntimeDefault", cname
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), (cname, kind)
            # Read-only root: whatever the process writes goes to a mounted volume (the
            # Pushgateway writes only its persistence file, under /data).
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts or mounts == {"/data"}, cname


def test_images_are_pinned():
    images = components_images()
    ours = set(images.values())
    for label, spec in [(lbl, s) for t in _kustomizations() for lbl, s in pod_specs(rendered(t))]:
        for container in containers(spec):
            image = container["image"]
            name = image.split("@")[0]
            assert ":" in name.rsplit("/", 1)[-1], f"{label}: untagged image {image}"
            tag = name.rsplit(":", 1)[1]
            assert tag != "latest" and not tag.startswith("latest"), f"{label}: {image}"
            if image not in ours:  # third-party: tag and digest
                assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"{label}: {image}"
            else:
                assert container.get("imagePullPolicy") == "Always", label


def test_no_secret_values_in_rendered_manifests():
    for target, doc in all_rendered():
        assert doc["kind"] != "Secret", f"{target} renders a Secret: secrets are applied apart"
        for label, spec in pod_specs([doc]):
            for container in containers(spec):
                for env in container.get("env", []):
                    if (
                        re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", env["name"])
                        and not env["name"].endswith("_FILE")
                        and not env["name"].endswith("_PATH")
                    ):
                        assert "value" not in env, f"{target}: {label}: {env['name']} inline"


def _git_visible_files(folder: Path) -> list[Path]:
    """Files of ``folder`` that git would commit (tracked, or untracked and not ignored)."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        return [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".env")]
    out = subprocess.run(
        [git, "ls-files", "--cached", "--others", "--exclude-standard", "-z", str(folder)],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [REPO / p for p in out.split("\0") if p and (REPO / p).is_file()]


PLACEHOLDER = re.compile(r"^(REPLACE_ME|<[^>]+>|)$")


def test_no_credentials_in_git():
    files = _git_visible_files(MANIFESTS) + _git_visible_files(REPO / "docs")
    assert files
    for path in files:
        rel = path.relative_to(REPO)
        assert not (path.name.endswith(".env") and not path.name.endswith(".example")), (
            f"{rel}: env files with credentials must stay git-ignored"
        )
        if path.suffix not in (".yaml", ".yml"):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "Secret":
                continue
            assert not doc.get("data"), f"{rel}: Secret with data"
            for key, value in (doc.get("stringData") or {}).items():
                assert PLACEHOLDER.match(str(value)), f"{rel}: {key} is not a placeholder"
    example = (MANIFESTS / "secrets" / "s3.env.example").read_text()
    for line in example.splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            assert PLACEHOLDER.match(value), f"s3.env.example: {key}"


def test_real_env_file_is_git_ignored():
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("s3.env", "prod.env"):
        proc = subprocess.run([git, "check-ignore", "-q", f"manifests/secrets/{name}"], cwd=REPO)
        assert proc.returncode == 0, f"manifests/secrets/{name} would be committed"
    proc = subprocess.run([git, "check-ignore", "-q", "manifests/secrets/s3.env.example"], cwd=REPO)
    assert proc.returncode == 1, "the example must stay committed"


@functools.cache
def _render_secrets_cached() -> tuple:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "secrets"
        shutil.copytree(MANIFESTS / "secrets", copy)
        shutil.copy(copy / "s3.env.example", copy / "s3.env")
        return tuple(_kustomize(copy))


def _render_secrets_from_example() -> list[dict]:
    return [json.loads(json.dumps(d)) for d in _render_secrets_cached()]


def test_secret_generator_renders_the_expected_secret():
    (secret,) = _render_secrets_from_example()
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "diffugts-s3"
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # The template mirrors the generator.
    template = yaml.safe_load((MANIFESTS / "secrets" / "secret.example.yaml").read_text())
    assert template["metadata"]["name"] == secret["metadata"]["name"]
    assert set(template["stringData"]) == set(secret["data"])


def test_rbac_is_least_privilege():
    for target in _kustomizations():
        docs = rendered(target)
        assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding"), target
        for role in by_kind(docs, "Role"):
            for rule in role["rules"]:
                where = f"{target}: Role/{role['metadata']['name']}: {rule}"
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], where
                assert "*" not in rule.get("apiGroups", []), where
                assert not {"escalate", "bind", "impersonate", "delete", "deletecollection", "update"} & set(
                    rule["verbs"]
                ), where
                if "secrets" in rule["resources"] or "configmaps" in rule["resources"]:
                    assert rule.get("resourceNames"), f"{where}: name the objects"
                    assert rule["verbs"] == ["get"], where
                assert not {"pods/exec", "pods/attach", "serviceaccounts/token"} & set(rule["resources"]), where
    # Service accounts that never call the API do not get a token.
    for overlay in overlays():
        for sa in by_kind(rendered(f"overlays/{overlay}"), "ServiceAccount"):
            if sa["metadata"]["name"] not in ("diffugts-pipeline", "diffugts-submitter"):
                assert sa.get("automountServiceAccountToken") is False, sa["metadata"]["name"]


def _selects(policy: dict, labels: dict) -> bool:
    selector = policy["spec"]["podSelector"]
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "DoesNotExist" and present:
            return False
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and labels.get(expr["key"]) in expr["values"]:
            return False
    return True


def test_network_policies_deny_by_default_and_admit_only_clients():
    for overlay in overlays():
        docs = rendered(f"overlays/{overlay}")
        policies = by_kind(docs, "NetworkPolicy")
        deny = one(docs, "NetworkPolicy", "default-deny-ingress")
        assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
        # Every pod of ours is denied by default: servers, the nightly submitter, pipeline steps.
        ours = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind(docs, "Deployment")]
        ours += [c["spec"]["workflowSpec"]["podMetadata"]["labels"] for c in by_kind(docs, "CronWorkflow")]
        ours.append({"workflows.argoproj.io/workflow": "diffugts-cohort-abc12", OWN_POD_LABEL[0]: OWN_POD_LABEL[1]})
        assert all(_selects(deny, labels) for labels in ours), overlay
        for deployment in by_kind(docs, "Deployment"):
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            name = deployment["metadata"]["name"]
            own = [p for p in policies if p is not deny and _selects(p, labels)]
            assert own, f"{overlay}: {name} has no ingress rule of its own"
            ports = {c["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
            for policy in own:
                # Servers open no connections: egress denied.
                assert "Egress" in policy["spec"]["policyTypes"], (overlay, name)
                assert policy["spec"].get("egress", []) == [], (overlay, name)
                for rule in policy["spec"]["ingress"]:
                    assert rule.get("from"), f"{overlay}: {name}: ingress from anywhere"
                    assert rule.get("ports"), f"{overlay}: {name}: ingress on every port"
                    assert {p["port"] for p in rule["ports"]} <= ports, (overlay, name)
        # Pipeline pods (Argo workflow pods) may reach every server of ours.
        pipeline_pod = {"workflows.argoproj.io/workflow": "diffugts-cohort-abc12"}
        for policy in policies:
            if policy is deny or "Ingress" not in policy["spec"]["policyTypes"]:
                continue
            peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
            assert any(
                "podSelector" in p
                and "namespaceSelector" not in p
                and _selects({"spec": {"podSelector": p["podSelector"]}}, pipeline_pod)
                for p in peers
            ), (overlay, policy["metadata"]["name"])


# Pods that Kubeflow and its users run in a profile namespace (labels as their controllers set
# them): a Jupyter notebook, a KServe predictor, the KFP artifact server of the namespace.
PROFILE_NEIGHBOURS = {
    "notebook": {"notebook-name": "scratch", "statefulset": "scratch", "app": "scratch"},
    "kserve": {"serving.kserve.io/inferenceservice": "model", "component": "predictor"},
    "kfp-artifacts": {"app": "ml-pipeline-ui-artifact"},
}
# The label pipelines/resources.py puts on every pipeline step's pod.
OWN_POD_LABEL = ("app.kubernetes.io/part-of", "diffugts")


def test_kubeflow_overlay_leaves_other_pods_of_the_profile_namespace_alone():
    docs = rendered("overlays/kubeflow")
    for name, labels in PROFILE_NEIGHBOURS.items():
        selecting = [p["metadata"]["name"] for p in by_kind(docs, "NetworkPolicy") if _selects(p, labels)]
        assert not selecting, f"{name} pods are selected by {selecting}"


# ------------------------------------------------------------------------- checkov


def _derived_argo_objects(target: str, cron: dict) -> list[dict]:
    """What Argo creates from a CronWorkflow, for checkov (which scans Workflows and Pods, not
    CronWorkflows): the Workflow, and the Pod of each container template. The CronWorkflow's
    checkov.io/skip annotations carry over, so its exceptions stay written on it."""
    meta = cron["metadata"]
    annotations = {k: v for k, v in meta.get("annotations", {}).items() if k.startswith("checkov.io/")}
    workflow = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "annotations": annotations},
        "spec": cron["spec"]["workflowSpec"],
    }
    pods = []
    for label, spec in _argo_pod_specs(meta["name"], cron["spec"]["workflowSpec"]):
        name = re.sub(r"[^a-z0-9-]", "-", label.lower()).strip("-")
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": meta["namespace"],
                    "annotations": annotations,
                    "labels": cron["spec"]["workflowSpec"].get("podMetadata", {}).get("labels", {}),
                },
                "spec": spec,
            }
        )
    return [workflow] + pods


@pytest.fixture(scope="session")
def checkov_report(tmp_path_factory) -> list[dict]:
    """One checkov run over everything: rendered kustomizations, the objects Argo derives from
    the CronWorkflows, both Dockerfiles, the committed secret templates and the deployment
    guide (secrets scanner: no credential-looking strings)."""
    checkov = _tool("checkov")
    root = tmp_path_factory.mktemp("checkov")
    for target in _kustomizations():
        docs = rendered(target)
        if not docs:
            continue
        stem = target.replace("/", "_")
        text = yaml.safe_dump_all(docs, sort_keys=False)
        # The compiled pipelines map the Secret's key *name* AWS_SECRET_ACCESS_KEY to the env
        # var of that name; the secrets scanner takes the name for a base64 secret. kustomize
        # drops comments, so the exception is written here, on exactly those lines.
        text = re.sub(
            r"^(\s*secretKey: AWS_SECRET_ACCESS_KEY)$",
            r"\1  # checkov:skip=CKV_SECRET_6: a Secret key name that the pipeline maps to an env var, "
            r"not a credential value",
            text,
            flags=re.M,
        )
        (root / f"{stem}.yaml").write_text(text)
        derived = [obj for cron in by_kind(docs, "CronWorkflow") for obj in _derived_argo_objects(target, cron)]
        for i, obj in enumerate(derived):
            (root / f"{stem}.derived-{i}.yaml").write_text(yaml.safe_dump(obj, sort_keys=False))
    for flavour in ("cpu", "cuda"):
        (root / "images" / flavour).mkdir(parents=True)
        shutil.copy(REPO / "images" / flavour / "Dockerfile", root / "images" / flavour)
    secrets = root / "secrets-templates"
    secrets.mkdir()
    for path in list((MANIFESTS / "secrets").iterdir()) + [REPO / "docs" / "deployment.md"]:
        if path.is_file() and not path.name.endswith(".env"):
            shutil.copy(path, secrets)
    proc = subprocess.run(
        [
            checkov,
            "--directory",
            str(root),
            "--framework",
            "kubernetes",
            "argo_workflows",
            "dockerfile",
            "secrets",
            "--skip-download",  # offline: no guideline / policy download
            "--enable-secret-scan-all-files",  # also s3.env.example and the guide
            "--output",
            "json",
            "--compact",
        ],  # not --quiet: it drops skipped checks
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_UPDATE": "1"},
    )
    assert proc.returncode in (0, 1), f"checkov crashed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    return report if isinstance(report, list) else [report]


@pytest.mark.slow
def test_checkov_finds_nothing(checkov_report):
    frameworks = {r["check_type"]: r for r in checkov_report}
    failures = [
        f"{r['check_type']}: {f['check_id']} {f['check_name']} :: {f['resource']} ({f['file_path']})"
        for r in checkov_report
        for f in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failures, "\n".join(failures)
    assert frameworks["kubernetes"]["summary"]["passed"] > 100
    assert frameworks["dockerfile"]["summary"]["passed"] > 20
    assert frameworks["argo_workflows"]["summary"]["passed"] >= 2
    for r in checkov_report:
        assert not r["summary"].get("parsing_errors"), r["check_type"]


@pytest.mark.slow
def test_checkov_exceptions_are_justified(checkov_report):
    skipped = [f for r in checkov_report for f in r.get("results", {}).get("skipped_checks", [])]
    for finding in skipped:
        reason = (finding.get("check_result", {}).get("suppress_comment") or "").strip()
        assert len(reason) >= 40, f"{finding['check_id']} on {finding['resource']}: no reason"
    # Every exception written in the manifests is still needed (else remove it).
    written = set()
    for _, doc in all_rendered():
        for key, value in doc["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                written.add(value.split("=", 1)[0])
    used = {f["check_id"] for f in skipped}
    assert written <= used, f"unused checkov exceptions: {sorted(written - used)}"
