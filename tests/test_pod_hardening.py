"""Pipeline pods parse untrusted DICOM: every task is hardened like the other manifests
(non-root, scratch on an emptyDir, a label for its egress policy), the namespace enforces
Pod Security "restricted" and task egress is limited (issue #23). Checked on the compiled
pipeline YAML, the committed Kubernetes manifests and the rendered overlays."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from pipelines import compile as compile_mod
from pipelines.resources import POD_LABELS, RUN_AS, SCRATCH, TASK_LABEL

MANIFESTS = compile_mod.REPO / "manifests"


def _executors(doc: dict) -> tuple[set[str], dict]:
    """(executors of the pipeline spec, kubernetes platform settings per executor)."""
    spec = doc.get("spec", doc)
    pipeline = spec.get("pipelineSpec", spec)
    platform = spec.get("platformSpec", doc.get("platforms") and doc) or {}
    names = set(pipeline["deploymentSpec"]["executors"])
    settings = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return names, settings


def _assert_hardened(names: set[str], settings: dict, where: str) -> None:
    assert names and names <= set(settings), f"{where}: executors without settings: {names - set(settings)}"
    for name in names:
        s = settings[name]
        ctx = s["securityContext"]
        assert ctx["runAsNonRoot"] is True and int(ctx["runAsUser"]) == RUN_AS != 0, (where, name)
        assert int(ctx["runAsGroup"]) == RUN_AS, (where, name)
        mounts = {m["mountPath"]: m for m in s["emptyDirMounts"]}
        assert mounts[SCRATCH[1]]["sizeLimit"] == SCRATCH[2], (where, name)
        # One label set on every task: the egress policy's label and the kubeflow overlay's
        # default-deny-ingress label (app.kubernetes.io/part-of).
        assert POD_LABELS.items() <= s["podMetadata"]["labels"].items(), (where, name)
        assert s["podMetadata"]["labels"][TASK_LABEL[0]] == TASK_LABEL[1], (where, name)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_mod.compile_all(tmp_path_factory.mktemp("ir"))


def test_every_compiled_task_is_hardened(compiled):
    assert len(compiled) == len(compile_mod.PIPELINES)
    for path in compiled:
        docs = list(yaml.safe_load_all(path.read_text()))
        pipeline = docs[0]
        names = set(pipeline["deploymentSpec"]["executors"])
        settings = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        _assert_hardened(names, settings, path.name)


def test_every_committed_pipeline_version_is_hardened():
    for name in compile_mod.PIPELINES:
        docs = list(yaml.safe_load_all((MANIFESTS / "base" / "pipelines" / f"{name}.yaml").read_text()))
        versions = [d for d in docs if d and d.get("kind") == "PipelineVersion"]
        assert len(versions) == 1, name
        _assert_hardened(*_executors(versions[0]), name)


def _rendered(overlay: str) -> list[dict]:
    text = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return [d for d in yaml.safe_load_all(text) if d]


def test_namespace_enforces_restricted():
    (ns,) = [d for d in yaml.safe_load_all((MANIFESTS / "base" / "namespace.yaml").read_text()) if d]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", ["standalone", "kubeflow"])
def test_task_egress_is_limited_to_named_peers(overlay):
    docs = _rendered(overlay)
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "pipeline-task-egress"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {TASK_LABEL[0]: TASK_LABEL[1]}}
    assert spec["policyTypes"] == ["Egress"]
    ports = set()
    for rule in spec["egress"]:
        assert rule.get("ports"), rule  # never every port
        ports |= {p["port"] for p in rule["ports"]}
        if "to" not in rule:  # only the Kubernetes API may go to any address
            assert {p["port"] for p in rule["ports"]} == {443, 6443}, rule
        for peer in rule.get("to", []):
            assert "ipBlock" not in peer and (peer.get("podSelector") or peer.get("namespaceSelector")), peer
    assert {53, 9091, 9000, 8333} <= ports
    # The servers the tasks use are among the peers of that overlay.
    pushgateway = [d for d in docs if d["kind"] == "Deployment" and "pushgateway" in d["metadata"]["name"]]
    assert pushgateway
