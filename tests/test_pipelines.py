"""The Kubeflow side: pipelines compile, load back, and run with kfp.local."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from kfp import components, local

from components.images import CPU_IMAGE, GPU_IMAGE
from modelfactory import random_package
from pipelines.compile import compile_all


def test_pipelines_compile_and_load_back(tmp_path):
    paths = compile_all(tmp_path)
    assert [p.name for p in paths] == [
        "diffugts-study.yaml",
        "diffugts-study-fused.yaml",
        "diffugts-cohort.yaml",
        "diffugts-protocol.yaml",
    ]
    study = components.load_component_from_file(str(paths[0]))
    assert study.name == "diffugts-study"
    assert set(study.component_spec.inputs) == {
        "input_uri",
        "model_uri",
        "prompts",
        "rules",
        "resample",
        "min_volume_ml",
        "upload",
        "results_uri",
        "maps",
        "verifier_threshold",
    }
    docs = [d for d in yaml.safe_load_all(paths[0].read_text()) if d]
    spec = docs[0]
    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-ingest"]["container"]["image"] == CPU_IMAGE
    assert executors["exec-attend"]["container"]["image"] == GPU_IMAGE
    for gpu_stage in ("exec-attend", "exec-synthesize", "exec-refine"):
        assert executors[gpu_stage]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    # GPU node selector / toleration and S3 credentials come through kfp-kubernetes.
    k8s = [d for d in docs if "platforms" in d][0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-attend"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert k8s["exec-attend"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["exec-ingest"]["secretAsEnv"][0]["secretName"] == "diffugts-s3"
    # Every step's pod carries the label the kubeflow overlay's default-deny-ingress selects.
    for path in paths:
        doc = [d for d in yaml.safe_load_all(path.read_text()) if d and "platforms" in d][0]
        for name, executor in doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
            assert executor["podMetadata"]["labels"]["app.kubernetes.io/part-of"] == "diffugts", (path.name, name)
    # kfp is preinstalled in our images: no pip install at container start.
    for executor in executors.values():
        assert not any("pip install" in part for part in executor["container"]["command"])
    # Parameters carry descriptions for the Kubeflow UI.
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert all(p.get("description") for p in params.values())


def test_fused_study_pipeline_has_one_gpu_task_and_the_same_interface(tmp_path):
    paths = compile_all(tmp_path)
    staged, fused = (components.load_component_from_file(str(p)) for p in paths[:2])
    assert fused.name == "diffugts-study-fused"
    assert set(fused.component_spec.inputs) == set(staged.component_spec.inputs)
    spec = next(d for d in yaml.safe_load_all(paths[1].read_text()) if d)
    executors = spec["deploymentSpec"]["executors"]
    assert sorted(executors) == ["exec-fingerprint", "exec-ingest", "exec-report", "exec-segment"]
    assert executors["exec-segment"]["container"]["image"] == GPU_IMAGE
    assert executors["exec-segment"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    # The cohort runs studies in batches, one GPU task per batch: no per-study GPU task in it.
    cohort = next(d for d in yaml.safe_load_all(paths[2].read_text()) if d)
    gpu = [
        name
        for name, e in cohort["deploymentSpec"]["executors"].items()
        if e["container"].get("resources", {}).get("accelerator")
    ]
    assert gpu == ["exec-segment-batch"]
    assert cohort["deploymentSpec"]["executors"]["exec-segment-batch"]["container"]["image"] == GPU_IMAGE
    # The cohort takes the study pipelines' model-side choices too, and its scale settings.
    cohort_inputs = set(components.load_component_from_file(str(paths[2])).component_spec.inputs)
    assert {
        "model_uri",
        "prompts",
        "min_volume_ml",
        "maps",
        "batch_size",
        "max_parallel",
        "verifier_threshold",
    } <= cohort_inputs


# What a cached task's result depends on besides its input values: the content behind these URI
# parameters. Each must come with its content fingerprint, from an uncached task.
CONTENT_KEYS = {"input_uri": "study_sha256", "model_uri": "model_sha256"}


def _tasks(spec: dict):
    """(task name, task spec, component spec) of every task in the IR, nested DAGs included."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            yield name, task, dag, spec["components"][task["componentRef"]["name"]]


def test_cached_tasks_key_on_the_content_of_the_study_and_the_model(tmp_path):
    """KFP's cache key holds input values, not what a URI points to: a model replaced under the
    same URI would be served the old model's masks. Every cached task that reads the study or
    the model takes their fingerprints too, made by a task that is never cached."""
    checked = 0
    for path in compile_all(tmp_path):
        spec = next(d for d in yaml.safe_load_all(path.read_text()) if d)
        for name, task, dag, component in _tasks(spec):
            if "dag" in component or not task.get("cachingOptions", {}).get("enableCache"):
                continue
            params = set(component.get("inputDefinitions", {}).get("parameters", {}))
            for uri, key in CONTENT_KEYS.items():
                if uri not in params:
                    continue
                checked += 1
                assert key in params, f"{path.name}: cached task {name} reads {uri} without {key}"
                source = task["inputs"]["parameters"][key]["taskOutputParameter"]
                producer = dag["tasks"][source["producerTask"]]
                assert source["outputParameterKey"] == key, (path.name, name)
                assert not producer.get("cachingOptions", {}).get("enableCache"), (path.name, source)
    assert checked >= 6  # staged: ingest + three model stages; fused: ingest + segment


@pytest.mark.slow
def test_library_never_imports_kfp():
    code = (
        "import sys, pkgutil, importlib, diffugts\n"
        "for m in pkgutil.walk_packages(diffugts.__path__, 'diffugts.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print('kfp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def kfp_local(tmp_path, monkeypatch):
    # kfp.local writes scratch folders to the temp dir; keep them inside tmp_path.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    warnings.filterwarnings("ignore", module=r"kfp\.local(\..*)?$")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    return tmp_path


@pytest.mark.slow
def test_study_pipeline_runs_locally(kfp_local):
    from diffugts.phantom import CaseSpec, generate_case, write_case
    from pipelines.study import study_pipeline

    case = write_case(generate_case(CaseSpec(seed=3, index=0, shape=(32, 64, 64))), kfp_local / "cases")
    model = random_package(kfp_local / "model")
    task = study_pipeline(input_uri=str(case / "dicom"), model_uri=str(model.root), prompts=["liver tumor"])
    out = Path(task.outputs["Output"].path)
    summary = json.loads((out / "report.json").read_text())
    assert summary["status"] == "done" and summary["targets"][0]["text"] == "liver tumor"
    assert (out / "report.html").exists() and (out / "sr.dcm").exists()
    root = out.parents[1]  # the run folder: one sub-folder per task
    assert {p.name for p in root.iterdir() if p.is_dir()} >= {"ingest", "attend", "synthesize", "refine", "report"}


@pytest.mark.slow
def test_fused_study_pipeline_writes_what_the_staged_one_writes(kfp_local):
    from diffugts.phantom import CaseSpec, generate_case, write_case
    from pipelines.study import study_pipeline
    from pipelines.study_fused import study_fused_pipeline

    case = write_case(generate_case(CaseSpec(seed=3, index=0, shape=(32, 64, 64))), kfp_local / "cases")
    model = random_package(kfp_local / "model")
    reports = []
    for pipeline in (study_pipeline, study_fused_pipeline):
        task = pipeline(
            input_uri=str(case / "dicom"), model_uri=str(model.root), prompts=["liver tumor", "kidney tumor"]
        )
        reports.append(json.loads((Path(task.outputs["Output"].path) / "report.json").read_text()))
    fused_root = Path(task.outputs["Output"].path).parents[1]
    assert {p.name for p in fused_root.iterdir() if p.is_dir()} == {"fingerprint", "ingest", "segment", "report"}
    staged, fused = reports
    assert fused["status"] == "done"
    assert [(t["text"], t["score"], t["total_volume_ml"]) for t in fused["targets"]] == [
        (t["text"], t["score"], t["total_volume_ml"]) for t in staged["targets"]
    ]
    # Same model, same seeds: the same lesions, whichever way the stages ran.
    assert [(x["target"], x["volume_ml"]) for x in fused["lesions"]] == [
        (x["target"], x["volume_ml"]) for x in staged["lesions"]
    ]


def verified_package(root: Path):
    """A random fused package whose heads mark every voxel, with a verifier that gives every
    candidate probability 0.5 and keeps those of at least 0.4."""
    from diffugts.models.package import add_networks
    from diffugts.stages.verification import FEATURES, LesionVerifier

    pkg = random_package(root / "random", fused=True)
    n = len(FEATURES)
    verifier = LesionVerifier((0.0,) * n, 0.0, (0.0,) * n, (1.0,) * n, 0.4)
    refine = {**pkg.network("refine"), "threshold": 0.0, "verifier": verifier.as_dict()}
    networks = {
        "aova": ({**pkg.network("aova"), "threshold": 0.02}, pkg.state_dict("aova")),
        "refine": (refine, pkg.state_dict("refine")),
    }
    return add_networks(pkg, networks, out=root / "verified")


@pytest.mark.slow
def test_pipelines_take_the_verifiers_operating_point(kfp_local):
    """The staged pipeline (its refine component) and the fused one (its segment component)
    pass verifier_threshold on; below 0 (the default) is the model's own."""
    from diffugts.phantom import CaseSpec, generate_case, write_case
    from pipelines.study import study_pipeline
    from pipelines.study_fused import study_fused_pipeline

    case = write_case(generate_case(CaseSpec(seed=3, index=0, shape=(32, 64, 64))), kfp_local / "cases")
    model = str(verified_package(kfp_local / "model").root)
    for pipeline in (study_pipeline, study_fused_pipeline):
        found = {}
        for threshold in (-1.0, 0.6):
            task = pipeline(
                input_uri=str(case / "dicom"), model_uri=model, prompts=["liver tumor"], verifier_threshold=threshold
            )
            found[threshold] = json.loads((Path(task.outputs["Output"].path) / "report.json").read_text())["lesions"]
        assert found[-1.0] and found[0.6] == [], pipeline  # 0.5 passes the model's 0.4, not 0.6


@pytest.mark.slow
def test_study_pipeline_fails_cleanly_on_bad_input(kfp_local, capfd):
    from pipelines.study import study_pipeline

    (kfp_local / "empty").mkdir()
    (kfp_local / "model").mkdir()  # enough of a package for its fingerprint: ingestion fails first
    (kfp_local / "model" / "manifest.json").write_text("{}")
    with pytest.raises(RuntimeError, match="Inner task failed"):
        study_pipeline(input_uri=str(kfp_local / "empty"), model_uri=str(kfp_local / "model"))
    err = capfd.readouterr()
    assert "diffugts: error: " in err.out + err.err and "no files found" in err.out + err.err


_TINY = """
from kfp import dsl

@dsl.component(base_image="python:3.11")
def echo(text: str) -> str:
    return text

@dsl.pipeline(name="diffugts-cohort", description="version name check")
def tiny(studies_uri: str = DEFAULT):
    echo(text=studies_uri)
"""


def _tiny_pipeline(folder: Path, default: str):
    # From a file of its own: kfp reads the component's source, and this module's
    # `from __future__ import annotations` would hide the parameter types from it.
    import importlib.util

    name = f"tiny_{abs(hash(default))}"
    path = folder / f"{name}.py"
    path.write_text(_TINY.replace("DEFAULT", repr(default)))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny


def _version_names(out: Path) -> list[str]:
    docs = [
        d
        for p in sorted(out.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]
    return [d["metadata"]["name"] for d in docs if d["kind"] == "PipelineVersion"]


def test_pipeline_version_name_follows_the_spec(tmp_path, monkeypatch):
    """KFP's PipelineVersion spec is immutable: re-applying a changed spec under the same name
    is rejected. A changed spec gets a new name; an unchanged one keeps its name."""
    from pipelines import compile as compile_module

    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kustomization.yaml").write_text("resources:\n  - old.yaml\n")
    names = []
    for default in ("s3://a/", "s3://a/", "s3://b/"):
        monkeypatch.setattr(compile_module, "PIPELINES", {"diffugts-cohort": _tiny_pipeline(tmp_path / "src", default)})
        compile_module.compile_manifests(tmp_path / "out")
        names.append(_version_names(tmp_path / "out"))
    assert names[0] == names[1] and names[1] != names[2], names
    assert all(n[0].startswith("diffugts-cohort-") for n in names)
    assert "  - diffugts-cohort.yaml\n" in (tmp_path / "out" / "kustomization.yaml").read_text()


def test_committed_manifests_are_what_make_compile_writes(tmp_path):
    """manifests/base/pipelines is committed: it must be today's `make compile` output."""
    import shutil

    from pipelines.compile import MANIFESTS, compile_manifests

    shutil.copy(MANIFESTS / "kustomization.yaml", tmp_path / "kustomization.yaml")
    for path in compile_manifests(tmp_path):
        assert path.read_text() == (MANIFESTS / path.name).read_text(), f"{path.name} is stale: run make compile"
    assert (tmp_path / "kustomization.yaml").read_text() == (MANIFESTS / "kustomization.yaml").read_text()


def test_cohort_workflow_stays_small_at_10000_studies(tmp_path):
    """benchmarks/workflow_size.py: the Argo Workflow of a 10,000-study cohort run, estimated
    from the compiled IR, stays under 2,000 nodes and 1 MB of status (the task-per-study
    layout it replaced: over 100,000 nodes)."""
    out = tmp_path / "size.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/workflow_size.py", "--studies", "100", "10000", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {(r["studies"], r["layout"].split(":")[0].split(",")[0]): r for r in json.loads(out.read_text())}
    assert rows[(10000, "before")]["nodes"] > 100_000
    for key in ((100, "after"), (10000, "after")):
        assert rows[key]["nodes"] < 2000 and rows[key]["status_bytes"] < 1_000_000, key
    largest = [r for r in json.loads(out.read_text()) if "max_parallel" in r["layout"]][0]
    assert largest["nodes"] < 2000 and largest["status_bytes"] < 1_000_000


def test_protocol_pipeline_trains_and_evaluates_on_the_data_volume(tmp_path):
    """Three GPU tasks in a chain, the datasets' volume mounted on each, nothing cached."""
    path = next(p for p in compile_all(tmp_path) if p.name == "diffugts-protocol.yaml")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    spec = docs[0]
    executors = spec["deploymentSpec"]["executors"]
    assert sorted(executors) == [
        "exec-evaluate-on-datasets",
        "exec-train-aova-on-datasets",
        "exec-train-refine-on-datasets",
    ]
    for executor in executors.values():
        assert executor["container"]["image"] == GPU_IMAGE
        assert executor["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train-refine-on-datasets"]["dependentTasks"] == ["train-aova-on-datasets"]
    assert tasks["evaluate-on-datasets"]["dependentTasks"] == ["train-refine-on-datasets"]
    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())
    k8s = [d for d in docs if "platforms" in d][0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in executors:
        mount = k8s[name]["pvcMount"][0]
        assert mount["mountPath"] == "/data"
        # The volume is the pipeline's data_pvc parameter, on every task.
        assert mount["pvcNameParameter"] == {"componentInputParameter": "data_pvc"}
    inputs = set(components.load_component_from_file(str(path)).component_spec.inputs)
    assert {"model_uri", "protocol", "data_pvc", "data_root", "aova_steps", "refine_steps"} <= inputs


@pytest.mark.slow
def test_protocol_pipeline_runs_locally(kfp_local):
    import datasetfactory as F
    from pipelines.protocol import protocol_pipeline

    data = kfp_local / "data"
    cases = F.make_cases(range(8), split="seen")[:3]
    F.write_msd(data / "seen", cases)
    F.write_nnunet(data / "unseen", F.make_cases(range(4), seed=43, split="unseen", organs=("liver",))[:1])
    F.write_mapping(data / "seen.json", name="kits23")
    F.write_mapping(data / "unseen.json", name="msd-task07-pancreas")
    (data / "split.json").write_text(
        json.dumps(
            {
                "seen_types": list(F.SEEN_TYPES),
                "held_out_fraction": 0.3,
                "train": [{"mapping": str(data / "seen.json"), "path": "seen"}],
                "evaluate": [{"mapping": str(data / "unseen.json"), "path": "unseen"}],
            }
        )
    )
    model = random_package(kfp_local / "model", heads=False)
    task = protocol_pipeline(
        model_uri=str(model.root),
        protocol=str(data / "split.json"),
        data_root=str(data),
        aova_steps=2,
        refine_steps=2,
        synthesis_steps=2,
        randomised_cases=0,
    )
    out = Path(task.outputs["Output"].path)
    result = json.loads((out / "evaluation.json").read_text())
    roles = {d["name"]: d["role"] for d in result["datasets"]}
    assert roles == {"kits23": "held-out", "msd-task07-pancreas": "evaluate"}
    assert {(r["dataset"], r["split"]) for r in result["rows"]} == {
        ("kits23", "seen"),
        ("msd-task07-pancreas", "unseen"),
    }
    md = (out / "evaluation.md").read_text()
    assert "| kits23 | seen |" in md and "| msd-task07-pancreas | unseen |" in md
    assert not (data / ".diffugts-checkpoints").exists() or not any((data / ".diffugts-checkpoints").rglob("*.pt"))
