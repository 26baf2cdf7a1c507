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

from components.images import CPU_IMAGE
from dicomfactory import write_series
from pipelines.compile import compile_all


def test_pipelines_compile_and_load_back(tmp_path):
    paths = compile_all(tmp_path)
    assert [p.name for p in paths] == ["diffugts-study.yaml"]
    study = components.load_component_from_file(str(paths[0]))
    assert study.name == "diffugts-study"
    assert set(study.component_spec.inputs) == {"input_uri", "rules", "resample"}
    spec = yaml.safe_load(paths[0].read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-ingest"]["container"]["image"] == CPU_IMAGE
    # kfp is preinstalled in our images: no pip install at container start.
    assert not any("pip install" in part for part in executors["exec-ingest"]["container"]["command"])
    # Parameters carry descriptions for the Kubeflow UI.
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert all(p.get("description") for p in params.values())


def test_library_never_imports_kfp():
    code = ("import sys, pkgutil, importlib, diffugts\n"
            "for m in pkgutil.walk_packages(diffugts.__path__, 'diffugts.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "print('kfp' in sys.modules)")
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


def test_study_pipeline_runs_locally(kfp_local):
    from pipelines.study import study_pipeline

    write_series(kfp_local / "study", n=7)
    task = study_pipeline(input_uri=str(kfp_local / "study"))
    out = Path(task.outputs["Output"].path)
    series = json.loads((out / "series.json").read_text())
    assert series["volume"]["size_ijk"] == [10, 12, 7]
    summary = (out.parent / "summary").read_text()
    assert "**Taken:** series 1" in summary


def test_study_pipeline_fails_cleanly_on_bad_input(kfp_local, capfd):
    from pipelines.study import study_pipeline

    (kfp_local / "empty").mkdir()
    with pytest.raises(RuntimeError, match="Inner task failed"):
        study_pipeline(input_uri=str(kfp_local / "empty"))
    err = capfd.readouterr()
    assert "diffugts: error: " in err.out + err.err and "no files found" in err.out + err.err
