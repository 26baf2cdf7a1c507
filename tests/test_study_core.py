"""benchmarks/study_core.py's counting, from outside: a process started with its
sitecustomize counts package opens, checksums, study volume reads and model-grid puts,
whatever module imported the counted functions first, names the calling function, and
changes no result."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "study_core.py"


def _load():
    spec = importlib.util.spec_from_file_location("study_core", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # stdlib only at import: nothing is patched here
    return module


CODE = """
import json, sys
import numpy as np
import SimpleITK as sitk
from diffugts.models import open_package            # bound before and after the patch
from diffugts.models.package import open_package as direct
from diffugts.stages.preprocess import Preprocessing, to_model
from diffugts.artifacts.geometry import Geometry

pkg = open_package("demo")                          # 1 open, 1 verification
direct("demo", verify=False)                        # 1 open, no verification
pkg.sha256                                          # a hash, not a checksum pass
study = sys.argv[1]
sitk.ReadImage(study + "/volume.nii.gz")            # the study volume: counted
sitk.ReadImage(study + "/other.nii.gz")             # another image: not counted
g = Geometry(np.zeros(3), np.array([2.0, 2.0, 2.0]), np.eye(3), (16, 16, 16))
x, space = to_model(np.full((16, 16, 16), 100.0, np.float32), g, "CT", Preprocessing((2.0, 2.0, 2.0)))
space.to_model(np.ones((16, 16, 16), np.float32))   # same grid: a copy
y, space = to_model(np.zeros((16, 16, 16), np.float32), g, "CT", Preprocessing((3.0, 3.0, 3.0)))
# A stage module's function that opens the package: the count is put on it.
import types
stage = types.ModuleType("diffugts.stages.fakestage")
exec("from diffugts.models.package import open_package; load = lambda: open_package('demo', verify=False)",
     stage.__dict__)
stage.load()
print(json.dumps({"x": float(x.sum()), "shape": list(y.shape), "files": len(pkg.manifest["files"])}))
"""


def test_sitecustomize_counts_in_a_subprocess(tmp_path):
    sc = _load()
    study = tmp_path / "study"
    study.mkdir()
    for name in ("volume.nii.gz", "other.nii.gz"):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(study / name))
    (study / "series.json").write_text(json.dumps({"volume": {"file": "volume.nii.gz"}}))
    hooks, counts = tmp_path / "hooks", tmp_path / "counts"
    hooks.mkdir()
    counts.mkdir()
    (hooks / "sitecustomize.py").write_text(sc.SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO / "src"), str(REPO)]),
        sc.ENV_SCRIPT: str(SCRIPT),
        sc.ENV_COUNTS: str(counts),
    }
    plain = {**env, sc.ENV_COUNTS: ""}
    run = [sys.executable, "-c", CODE, str(study)]
    counted = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    uncounted = subprocess.run(run, env=plain, capture_output=True, text=True, check=True)
    assert counted.stdout == uncounted.stdout  # the wrappers change no result
    out = json.loads(counted.stdout)
    assert out["x"] == pytest.approx(16**3 * (100 + 1000) / 2000)  # the default CT window, [-1000, 1000]
    assert out["shape"] == [16, 16, 16]

    total = sc.read_counts(counts)
    assert len(total["processes"]) == 1
    assert total["counts"] == {
        "package_opens": 3,
        "package_verifications": 1,
        "files_hashed": out["files"],
        "other_sha256": 1,
        "study_reads": 1,
        "to_model": 2,
        "space_to_model": 3,
        "space_to_model_interpolated": 1,
    }
    # a count is put on the diffugts function that called the counted one ("?": the script)
    assert total["callers"]["package_opens"] == {"?": 2, "fakestage.<lambda>": 1}
    assert total["callers"]["study_reads"] == {"?": 1}
    assert list(counts.glob("*.json")) and not list(counts.glob("*.tmp"))


def test_warm_path_detects_a_core(monkeypatch, tmp_path):
    """The warm path: one diffugts.core.Core reused through segment(core=...) when the tree
    has both, else segment() again (the runner and the core are stand-ins here)."""
    import types

    sc = _load()
    calls = []

    class Core:
        def __init__(self, model, device=None, params=None):
            calls.append(("core", model, params))

        def load(self):
            return self

    def segment(input_ref, out, prompts, *, model=None, show_progress=True, core=None):
        calls.append(("segment", input_ref, out, model, core is not None))
        return {"timings_s": {}}

    runner = types.ModuleType("fake_runner")
    runner.segment, runner.method_params = segment, lambda: "PARAMS"
    core_module = types.ModuleType("diffugts.core")
    core_module.Core = Core
    monkeypatch.setitem(sys.modules, "fake_runner", runner)
    monkeypatch.setattr(sc, "SEGMENT_MODULES", ("fake_runner",))
    monkeypatch.setitem(sys.modules, "diffugts.core", core_module)
    description, run = sc.warm_path("MODEL", ["liver tumor"])
    assert description.startswith("one Core(model).load(), then segment(core=core)")
    run(tmp_path / "s1", tmp_path / "o1")
    run(tmp_path / "s2", tmp_path / "o2")
    assert calls == [
        ("core", "MODEL", "PARAMS"),
        ("segment", str(tmp_path / "s1"), tmp_path / "o1", None, True),
        ("segment", str(tmp_path / "s2"), tmp_path / "o2", None, True),
    ]

    calls.clear()
    monkeypatch.setitem(sys.modules, "diffugts.core", None)  # a tree without a core (the old layout)
    description, run = sc.warm_path("MODEL", ["liver tumor"])
    assert description == "segment() again in the same process"
    run(tmp_path / "s1", tmp_path / "o1")
    assert calls == [("segment", str(tmp_path / "s1"), tmp_path / "o1", "MODEL", False)]

    monkeypatch.setitem(sys.modules, "diffugts.core", types.ModuleType("diffugts.core"))  # no Core in it
    description, _ = sc.warm_path("MODEL", ["liver tumor"])
    assert description.startswith("segment() again") and "adjust warm_path()" in description
