"""Per study: how often the model package is opened, the study volume read and resampled to
the model grid, and what a study costs (issue 21: the in-memory core), measured from outside.

    python benchmarks/study_core.py --tree /work/main                       # one source tree
    python benchmarks/study_core.py --baseline-tree /work/before --tree /work/main   # side by side
    python benchmarks/study_core.py --tree T --study phantom_7_0001 --skip-kfp --skip-evaluate

Every measurement runs in a subprocess with ``PYTHONPATH=TREE/src:TREE`` (the tree's
``diffugts``, ``components`` and ``pipelines``), on the `make run` demo studies
(``pipelines.run_local.demo_studies``, written once under the work folder with the first
tree and shared by both), with the demo prompts and each tree's default model (``--model``
to force one). Figures per study:

- **counts**: model package opens (``open_package``), checksum passes (``verify_files``) and
  package files checksummed in them (``sha256_file`` called by ``verify_files``; other hashes,
  the manifest's as the package's identity, are listed by caller only); reads of the study
  volume from disk (SimpleITK reads of the file that the study artifact's ``series.json``
  names); the volume put on the model grid (``to_model``: normalised, resampled) and, wider,
  every array put on the model grid (``ModelSpace.to_model``: the volume, coarse maps, masks),
  with how many of those interpolate (the others are copies: a study already on the model
  grid, as the demo CT phantoms). Counted by wrapping those functions where callers look them
  up at run time (the module attribute and the names other ``diffugts`` modules imported from
  it; the class attribute for a method; ``SimpleITK.ImageFileReader.Execute``, which
  ``sitk.ReadImage`` uses), as each module is first imported; HOOKS names the modules, old
  layout and new. Subprocesses are instrumented through a ``sitecustomize`` put first on
  their PYTHONPATH, so kfp.local's task processes are counted too. Each count is listed by
  caller (``module.function``) at the end.
- ``diffugts segment`` wall time, **cold** (a fresh process running the CLI on one study) and
  **warm** (one process: a first study runs, then each study is timed; how a tree segments
  its second study is :func:`warm_path`: ``segment(core=...)`` with one loaded
  ``diffugts.core.Core`` where the tree has them, else ``segment()`` again; the one place to
  adjust if the core's API changes);
- the fused kfp.local study (``pipelines/study_fused.py`` through
  ``benchmarks/cpu_study.py``'s ``through_kfp_local``, the measured tree's own copy);
- ``diffugts evaluate --cases DIR`` (``--eval-cases``; default the demo studies' phantom cases).

With two trees the runs alternate (repeat r: baseline, then new) and, besides the ratios
new / baseline, the outputs of the two trees are compared with benchmarks/compare_outputs.py
(segment folders, kfp pipeline roots, evaluation folders): a no-behaviour-change tree must
give identical outputs. Times are medians over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.abc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV_COUNTS = "DIFFUGTS_BENCH_COUNTS"  # folder where each instrumented process writes <pid>.json
ENV_SCRIPT = "DIFFUGTS_BENCH_SCRIPT"  # this file, loaded by the subprocesses' sitecustomize

# What is counted, and where it lives in each layout (the old one, then the new one).
PACKAGE_HOOKS = {
    "open_package": "package_opens",
    "verify_files": "package_verifications",
    "sha256_file": "files_hashed",
}
PREPROCESS_HOOKS = {"to_model": "to_model", "ModelSpace.to_model": "space_to_model"}
HOOKS = {
    "diffugts.models.package": PACKAGE_HOOKS,
    "diffugts.preprocess": PREPROCESS_HOOKS,  # 544d412 and before
    "diffugts.stages.preprocess": PREPROCESS_HOOKS,  # fe96cec and after
}
SEGMENT_MODULES = ("diffugts.runners.segment", "diffugts.segment")
COUNTS = (
    "package_opens",
    "package_verifications",
    "files_hashed",
    "study_reads",
    "to_model",
    "space_to_model",
    "space_to_model_interpolated",
)
COUNT_LABELS = {
    "package_opens": "model package opens",
    "package_verifications": "package checksum passes",
    "files_hashed": "package files hashed",
    "study_reads": "study volume reads from disk",
    "to_model": "volume to model grid (`to_model`)",
    "space_to_model": "arrays put on the model grid (`ModelSpace.to_model`, any array)",
    "space_to_model_interpolated": "... of which interpolated (model grid not the study grid)",
}
# Modules a count is not attributed to: the counted functions' own and the artifact readers
# (the stage that called them is wanted).
_NOT_CALLERS = (".package", ".preprocess", ".study", ".geometry", ".files")


# -- counting (runs inside the measured processes) ------------------------------------------

_STATE: dict = {"installed": False, "counts": {}, "callers": {}, "patched": []}


def reset_counts() -> None:
    _STATE["counts"], _STATE["callers"] = {}, {}


def counts() -> dict:
    return {
        "counts": dict(_STATE["counts"]),
        "callers": json.loads(json.dumps(_STATE["callers"])),
        "patched": list(_STATE["patched"]),
    }


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if (
            name.startswith(("diffugts", "components"))
            and not name.endswith(_NOT_CALLERS)
            and not name.startswith("diffugts.artifacts.")
        ):
            return f"{name.rsplit('.', 1)[-1]}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _count(what: str) -> None:
    _STATE["counts"][what] = _STATE["counts"].get(what, 0) + 1
    by = _STATE["callers"].setdefault(what, {})
    caller = _caller()
    by[caller] = by.get(caller, 0) + 1
    folder = os.environ.get(ENV_COUNTS)
    if folder:  # a subprocess: its counts so far, rewritten at every event (survives os._exit)
        path = Path(folder) / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"argv": sys.argv[:8], **counts()}))
            os.replace(tmp, path)
        except OSError:
            pass


def _study_volume(path) -> bool:
    """Is ``path`` the volume file of a study artifact (the file its series.json names)?"""
    try:
        p = Path(os.fspath(path))
        marker = p.parent / "series.json"
        return marker.is_file() and json.loads(marker.read_text()).get("volume", {}).get("file") == p.name
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _counting(fn, what: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _count(what)
        return fn(*args, **kwargs)

    wrapper.__wrapped_by_bench__ = True
    return wrapper


def _hash_counting(fn):
    """sha256_file: a package file checksummed by ``verify_files``, or another hash (the
    manifest's, as the package's identity)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _count("files_hashed" if sys._getframe(1).f_code.co_name == "verify_files" else "other_sha256")
        return fn(*args, **kwargs)

    wrapper.__wrapped_by_bench__ = True
    return wrapper


def _space_counting(fn):
    """ModelSpace.to_model: an array on the study grid put on the model grid; interpolated
    unless the two grids are the same (then it is a copy)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        _count("space_to_model")
        try:
            same = bool(self.study.allclose(self.model, atol=1e-6))
        except Exception:
            same = False
        if not same:
            _count("space_to_model_interpolated")
        return fn(self, *args, **kwargs)

    wrapper.__wrapped_by_bench__ = True
    return wrapper


def _rebind(original, wrapper) -> None:
    """Point every loaded diffugts / components module that imported ``original`` by name at
    ``wrapper`` (modules imported later get the wrapper from the patched module itself)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith(("diffugts", "components")) or module is None:
            continue
        for key, value in list(vars(module).items()):
            if value is original:
                setattr(module, key, wrapper)


def _patch_module(name: str, module) -> None:
    if name == "SimpleITK":
        reader = module.ImageFileReader
        execute = reader.Execute
        if getattr(execute, "__wrapped_by_bench__", False):
            return

        @functools.wraps(execute)
        def Execute(self, *args, **kwargs):
            image = execute(self, *args, **kwargs)
            try:
                path = self.GetFileName()
            except Exception:
                path = ""
            if path and _study_volume(path):
                _count("study_reads")
            return image

        Execute.__wrapped_by_bench__ = True
        reader.Execute = Execute
        _STATE["patched"].append("SimpleITK.ImageFileReader.Execute")
        return
    for attr, what in HOOKS.get(name, {}).items():
        owner, _, attr_name = attr.rpartition(".")
        target = getattr(module, owner, None) if owner else module  # a class method: patched on the class
        original = getattr(target, attr_name, None)
        if original is None or getattr(original, "__wrapped_by_bench__", False):
            continue
        wrapper = (
            _hash_counting(original)
            if attr == "sha256_file"
            else _space_counting(original)
            if attr == "ModelSpace.to_model"
            else _counting(original, what)
        )
        setattr(target, attr_name, wrapper)
        if not owner:
            _rebind(original, wrapper)
        _STATE["patched"].append(f"{name}.{attr}")


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch_module(self._name, module)

    def __getattr__(self, attr):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, attr)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Patches a module of HOOKS (or SimpleITK) right after it is first imported: nothing is
    imported early, so a task that never uses the library pays nothing."""

    def find_spec(self, name, path, target=None):
        if name not in HOOKS and name != "SimpleITK":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, name)
                return spec
        return None


def install_hooks() -> None:
    """Count from now on: modules already imported are patched now, the others on import."""
    if _STATE["installed"]:
        return
    _STATE["installed"] = True
    sys.meta_path.insert(0, _PatchingFinder())
    for name in [*HOOKS, "SimpleITK"]:
        if name in sys.modules:
            _patch_module(name, sys.modules[name])


SITECUSTOMIZE = f'''"""Written by benchmarks/study_core.py: counts in every process started with it on PYTHONPATH."""
import os
if os.environ.get("{ENV_COUNTS}") and os.environ.get("{ENV_SCRIPT}"):
    import importlib.util
    import sys
    _spec = importlib.util.spec_from_file_location("_diffugts_bench_hooks", os.environ["{ENV_SCRIPT}"])
    _hooks = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _hooks
    _spec.loader.exec_module(_hooks)
    _hooks.install_hooks()
'''


def read_counts(folder: Path) -> dict:
    """The counts of every instrumented process that wrote into ``folder``, summed, plus each
    process's own (named by its kfp task or CLI command)."""
    total: dict = {"counts": {}, "callers": {}, "processes": []}
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        for what, n in doc["counts"].items():
            total["counts"][what] = total["counts"].get(what, 0) + n
        for what, by in doc["callers"].items():
            mine = total["callers"].setdefault(what, {})
            for caller, n in by.items():
                mine[caller] = mine.get(caller, 0) + n
        argv = doc.get("argv", [])
        name = (
            argv[argv.index("--function_to_execute") + 1]
            if "--function_to_execute" in argv
            else " ".join(a for a in argv[1:3] if not a.startswith("/"))
        )
        total["processes"].append({"process": name, "counts": doc["counts"]})
    return total


# -- inside a worker (a subprocess with the measured tree on its path) ----------------------


def _import_first(names):
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue
            raise
    raise ModuleNotFoundError(f"none of {', '.join(names)}")


def warm_path(model: str, prompts: list[str]):
    """How one process segments its second and later studies: ``(description, run)`` where
    ``run(study, out)`` segments one study into ``out`` (the `diffugts segment` folders).

    ADJUST HERE if the core's API changes. Today:

    - a tree with ``diffugts.core.Core`` and a runner ``segment()`` that takes ``core=``: the
      runner's own multi-study path, as runners/batch.py does it: one
      ``Core(model, None, method_params()).load()`` (built here, so its cost is part of the
      process's first study), then ``segment(..., core=core)`` per study;
    - otherwise (the old tree, fe96cec): the runner's ``segment()`` called again in the same
      process (imports done; the package re-opened and the networks re-loaded per call).
    """
    import inspect

    runner = _import_first(SEGMENT_MODULES)
    segment = runner.segment
    again = (
        "segment() again in the same process",
        lambda study, out: segment(str(study), out, prompts, model=model, show_progress=False),
    )
    try:
        core_module = importlib.import_module("diffugts.core")
    except ModuleNotFoundError as err:
        if err.name != "diffugts.core":
            raise
        return again
    Core = getattr(core_module, "Core", None)  # noqa: N806
    if Core is None or "core" not in inspect.signature(segment).parameters:
        print(
            "study_core: diffugts.core found, but no Core or no segment(core=...): timing segment() again "
            "instead; adjust warm_path() in benchmarks/study_core.py",
            file=sys.stderr,
        )
        return (f"{again[0]} (diffugts.core found, entry unknown: adjust warm_path())", again[1])
    params = getattr(runner, "method_params", None)
    core = Core(model, None, params()) if params else Core(model)
    core = core.load() if hasattr(core, "load") else core
    return (
        "one Core(model).load(), then segment(core=core) per study (as runners/batch.py)",
        lambda study, out: segment(str(study), out, prompts, core=core, show_progress=False),
    )


def worker_info(spec: dict) -> dict:
    import diffugts
    from diffugts.models.defaults import default_model
    from pipelines.run_local import PROMPTS, demo_studies

    model = str(Path(spec.get("model") or default_model()).resolve())
    out = {
        "diffugts": str(Path(diffugts.__file__).resolve().parent),
        "model": model,
        "prompts": PROMPTS,
        "model_manifest": _sha256(Path(model) / "manifest.json"),
    }
    if not spec.get("make_studies"):
        import torch

        out["torch_threads"] = torch.get_num_threads()
    if spec.get("make_studies"):
        names = demo_studies(Path(spec["make_studies"]))
        out["studies"] = {Path(p).name: {"path": p, "description": d} for p, d in names.items()}
    return out


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def worker_warm(spec: dict) -> dict:
    """One process: the first study (imports, model load), then every study timed and counted."""
    install_hooks()
    studies, outs = spec["studies"], Path(spec["out"])
    clock = time.perf_counter()
    description, run = warm_path(spec["model"], spec["prompts"])
    run(studies[0], outs / "first")
    first = time.perf_counter() - clock
    results = {}
    for study in studies:
        reset_counts()
        clock = time.perf_counter()
        result = run(study, outs / Path(study).name)
        stages = result.get("timings_s") if isinstance(result, dict) else None
        results[Path(study).name] = {"seconds": time.perf_counter() - clock, "stages_s": stages, **counts()}
    missing = [
        name for name in HOOKS if name in sys.modules and not any(p.startswith(name + ".") for p in _STATE["patched"])
    ]
    return {
        "warm_path": description,
        "first_s": first,
        "studies": results,
        "patched": _STATE["patched"],
        "unpatched_modules": missing,
    }


def worker_kfp(spec: dict) -> dict:
    """The fused study pipeline through kfp.local, per study (the tree's own cpu_study.py)."""
    import logging
    import warnings

    script = Path(spec["tree"]) / "benchmarks" / "cpu_study.py"
    if not script.is_file():
        script = HERE / "cpu_study.py"
    module_spec = importlib.util.spec_from_file_location("cpu_study", script)
    cpu_study = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(cpu_study)
    from pipelines.study_fused import study_fused_pipeline

    logging.disable(logging.WARNING)  # kfp.local logs every task at INFO/WARNING
    warnings.filterwarnings("ignore")
    results = {}
    for study in spec["studies"]:
        name = Path(study).name
        counts_dir = Path(spec["counts"]) / name
        counts_dir.mkdir(parents=True, exist_ok=True)
        os.environ[ENV_COUNTS] = str(counts_dir)  # the task processes inherit it
        out = Path(spec["out"]) / name
        out.mkdir(parents=True, exist_ok=True)
        seconds = cpu_study.through_kfp_local(Path(study), out, spec["model"], study_fused_pipeline)
        results[name] = {"seconds": seconds, "pipeline_root": str(out)}
    return {"studies": results, "cpu_study": str(script)}


WORKERS = {"info": worker_info, "warm": worker_warm, "kfp": worker_kfp}


# -- the parent: runs the workers and the CLIs, prints the table ----------------------------


class Tree:
    def __init__(self, path: Path, label: str, work: Path, python: str, threads: int | None = None):
        self.path, self.label, self.work, self.python = path.resolve(), label, work / label, python
        self.hooks, self.threads = work / "hooks", threads

    def env(self, counts: Path | None = None) -> dict:
        env = dict(os.environ)
        if self.threads:  # torch's CPU thread count: float sums (anomaly scores) depend on it
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        env["PYTHONPATH"] = os.pathsep.join([str(self.hooks), str(self.path / "src"), str(self.path)])
        env[ENV_SCRIPT] = str(Path(__file__).resolve())
        env.pop(ENV_COUNTS, None)
        if counts is not None:
            counts.mkdir(parents=True, exist_ok=True)
            env[ENV_COUNTS] = str(counts)
        return env

    def worker(self, mode: str, spec: dict, name: str) -> dict:
        folder = self.work / "workers"
        folder.mkdir(parents=True, exist_ok=True)
        spec_path, result_path = folder / f"{name}.spec.json", folder / f"{name}.result.json"
        spec_path.write_text(json.dumps({**spec, "tree": str(self.path)}))
        with open(folder / f"{name}.log", "w") as log:
            proc = subprocess.run(
                [self.python, str(Path(__file__).resolve()), "--_worker", mode, str(spec_path), str(result_path)],
                env=self.env(),
                cwd=self.work,
                stdout=log,
                stderr=log,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"{self.label}: worker {name} failed (rc {proc.returncode}); see {folder / name}.log")
        return json.loads(result_path.read_text())

    def cli(self, args: list[str], name: str, counts: Path) -> float:
        """Wall time of ``python -m diffugts ARGS`` in a fresh process (counted into ``counts``)."""
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.work / "logs" / f"{name}.log", "w") as log:
            clock = time.perf_counter()
            proc = subprocess.run(
                [self.python, "-m", "diffugts", "-q", *args],
                env=self.env(counts),
                cwd=self.work,
                stdout=log,
                stderr=log,
            )
            seconds = time.perf_counter() - clock
        if proc.returncode != 0:
            raise RuntimeError(
                f"{self.label}: `diffugts {' '.join(args[:2])}` failed (rc {proc.returncode}); "
                f"see {self.work / 'logs' / name}.log"
            )
        return seconds


def measure(trees: list[Tree], args, studies: dict, eval_cases: Path) -> dict:
    """Every figure of every tree; runs alternate between the trees, repeat by repeat."""
    res: dict = {t.label: {"tree": str(t.path), "studies": {s: {} for s in studies}, "evaluate": {}} for t in trees}
    for t in trees:
        res[t.label]["info"] = t.worker("info", {"model": args.model}, "info")
    paths = [studies[s]["path"] for s in studies]
    for r in range(args.repeat):
        for t in trees:
            info, mine = res[t.label]["info"], res[t.label]
            prompt_args = [a for p in info["prompts"] for a in ("--prompt", p)]
            if not args.skip_cold:
                for s, st in studies.items():
                    counts_dir = t.work / "counts" / f"cold-{s}-{r}"
                    seconds = t.cli(
                        [
                            "segment",
                            st["path"],
                            "--out",
                            str(t.work / "cold" / f"{s}-{r}"),
                            "--model",
                            info["model"],
                            *prompt_args,
                        ],
                        f"cold-{s}-{r}",
                        counts_dir,
                    )
                    entry = mine["studies"][s].setdefault("cold", {"seconds": [], "counts": []})
                    entry["seconds"].append(seconds)
                    entry["counts"].append(read_counts(counts_dir))
                    _progress(t, f"cold {s} run {r}: {seconds:.1f} s")
            if not args.skip_warm:
                warm = t.worker(
                    "warm",
                    {
                        "studies": paths,
                        "out": str(t.work / "warm" / str(r)),
                        "model": info["model"],
                        "prompts": info["prompts"],
                    },
                    f"warm-{r}",
                )
                mine.setdefault(
                    "warm", {"first_s": [], "path": warm["warm_path"], "unpatched_modules": warm["unpatched_modules"]}
                )
                mine["warm"]["first_s"].append(warm["first_s"])
                for s, st in warm["studies"].items():
                    entry = mine["studies"][s].setdefault("warm", {"seconds": [], "counts": [], "stages_s": []})
                    entry["seconds"].append(st["seconds"])
                    entry["stages_s"].append(st["stages_s"])
                    entry["counts"].append({"counts": st["counts"], "callers": st["callers"]})
                _progress(
                    t,
                    f"warm run {r}: first {warm['first_s']:.1f} s, then "
                    + ", ".join(f"{s} {st['seconds']:.1f} s" for s, st in warm["studies"].items()),
                )
            if not args.skip_kfp:
                kfp = t.worker(
                    "kfp",
                    {
                        "studies": paths,
                        "out": str(t.work / "kfp" / str(r)),
                        "counts": str(t.work / "counts" / f"kfp-{r}"),
                        "model": info["model"],
                    },
                    f"kfp-{r}",
                )
                for s, st in kfp["studies"].items():
                    entry = mine["studies"][s].setdefault("kfp", {"seconds": [], "counts": [], "roots": []})
                    entry["seconds"].append(st["seconds"])
                    entry["counts"].append(read_counts(t.work / "counts" / f"kfp-{r}" / s))
                    entry["roots"].append(st["pipeline_root"])
                _progress(
                    t,
                    f"kfp fused run {r}: "
                    + ", ".join(f"{s} {st['seconds']:.1f} s" for s, st in kfp["studies"].items()),
                )
            if not args.skip_evaluate:
                counts_dir = t.work / "counts" / f"evaluate-{r}"
                out = t.work / "evaluate" / str(r)
                seconds = t.cli(
                    ["evaluate", "--cases", str(eval_cases), "--out", str(out), "--model", info["model"]],
                    f"evaluate-{r}",
                    counts_dir,
                )
                entry = mine["evaluate"]
                entry.setdefault("seconds", []).append(seconds)
                entry.setdefault("counts", []).append(read_counts(counts_dir))
                entry.setdefault("outs", []).append(str(out))
                _progress(t, f"evaluate run {r}: {seconds:.1f} s")
    return res


def _progress(tree: Tree, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {tree.label}: {text}", flush=True)


def compare_trees(trees: list[Tree], res: dict, studies: dict, args) -> list[tuple[str, str]]:
    """Outputs of the baseline and the new tree, compared file by file (repeat 0)."""
    sys.path.insert(0, str(HERE))
    import compare_outputs

    a, b = trees
    pairs = []
    for s in studies:
        if not args.skip_cold:
            pairs.append((f"`segment` cold, {s}", a.work / "cold" / f"{s}-0", b.work / "cold" / f"{s}-0"))
        if not args.skip_warm:
            pairs.append((f"`segment` warm, {s}", a.work / "warm" / "0" / s, b.work / "warm" / "0" / s))
        if not args.skip_kfp:
            pairs.append(
                (
                    f"kfp fused, {s}",
                    Path(res[a.label]["studies"][s]["kfp"]["roots"][0]),
                    Path(res[b.label]["studies"][s]["kfp"]["roots"][0]),
                )
            )
    if not args.skip_evaluate:
        pairs.append(("`evaluate`", a.work / "evaluate" / "0", b.work / "evaluate" / "0"))
    out = []
    for name, x, y in pairs:
        kinds: dict[str, int] = {}
        count, lines = compare_outputs.compare(x, y, kinds)
        verdict = f"identical ({count} files)" if not lines else f"{len(lines)} of {count} files differ"
        out.append((name, verdict))
        for line in lines[:10]:
            print(f"  {name}: {line}")
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, tuple):
        return " · ".join(_fmt(x) for x in v)
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _ratio(a, b) -> str:
    if isinstance(a, tuple) and isinstance(b, tuple):
        a, b = (sum(a) if None not in a else None), (sum(b) if None not in b else None)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return ""
    if a == 0:
        return "" if b == 0 else "inf"
    return f"{b / a:.2f}"


MODES = {
    "cold": "cold `diffugts segment`",
    "warm": "warm `segment` (same process, after a first study)",
    "kfp": "kfp.local fused study (all tasks)",
}


def rows(res: dict, label: str, studies: dict) -> list[tuple[str, object]]:
    """(figure, value) rows of one tree, in table order. A count's value holds one number per
    study (in the order of the studies); its ratio is that of the sums."""
    mine, out = res[label], []
    for mode, where in MODES.items():
        if not all(mode in mine["studies"][s] for s in studies):
            continue
        firsts = [mine["studies"][s][mode]["counts"][0]["counts"] for s in studies]
        for what in COUNTS:
            out.append((f"{where}: {COUNT_LABELS[what]}", tuple(f.get(what, 0) for f in firsts)))
        for s in studies:
            runs = mine["studies"][s][mode]["counts"]
            if any(c["counts"] != runs[0]["counts"] for c in runs[1:]):
                out.append((f"WARNING: {mode} counts of {s} differ between repeats", "see --json"))
    for mode, where in MODES.items():
        if not all(mode in mine["studies"][s] for s in studies):
            continue
        for s in studies:
            out.append((f"{where}: wall time, {s} (s)", _median(mine["studies"][s][mode]["seconds"])))
        if len(studies) > 1:
            out.append(
                (
                    f"{where}: wall time, all {len(studies)} studies (s)",
                    sum(_median(mine["studies"][s][mode]["seconds"]) for s in studies),
                )
            )
    if "warm" in mine:
        out.append(
            ("warm process: its first study, imports and model load included (s)", _median(mine["warm"]["first_s"]))
        )
    if mine["evaluate"]:
        out.append(("`diffugts evaluate --cases` (s)", _median(mine["evaluate"]["seconds"])))
        first = mine["evaluate"]["counts"][0]["counts"]
        for what in ("package_opens", "package_verifications", "study_reads", "to_model"):
            out.append((f"`evaluate`: {COUNT_LABELS[what]}, whole run", first.get(what, 0)))
    return out


def report(trees: list[Tree], res: dict, studies: dict, compared: list[tuple[str, str]], args) -> None:
    labels = [t.label for t in trees]
    table = [rows(res, label, studies) for label in labels]
    print()
    for t in trees:
        info = res[t.label]["info"]
        warm = res[t.label].get("warm", {})
        print(
            f"- {t.label}: {t.path} (diffugts from {info['diffugts']}); model {info['model']} "
            f"(manifest sha256 {info['model_manifest'][:12]}); torch threads {info.get('torch_threads')}"
            + (f"; warm path: {warm['path']}" if warm else "")
        )
        if warm.get("unpatched_modules"):
            print(f"  WARNING: imported but not instrumented: {warm['unpatched_modules']} (adjust HOOKS)")
    if len(trees) == 2 and res[labels[0]]["info"]["model_manifest"] != res[labels[1]]["info"]["model_manifest"]:
        print("  WARNING: the two trees use different models (give --model)")
    print(
        f"\nstudies: {', '.join(studies)} (counts: one number per study, in this order); "
        f"repeats: {args.repeat} (times are medians); load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs\n"
    )
    if len(trees) == 1:
        print("| figure | value |\n|---|---|")
        for name, value in table[0]:
            print(f"| {name} | {_fmt(value)} |")
    else:
        print(f"| figure | {labels[0]} | {labels[1]} | ratio {labels[1]}/{labels[0]} |\n|---|---|---|---|")
        new = dict(table[1])
        for name, value in table[0]:
            print(f"| {name} | {_fmt(value)} | {_fmt(new.get(name))} | {_ratio(value, new.get(name))} |")
        for name, value in table[1]:
            if name not in dict(table[0]):
                print(f"| {name} | - | {_fmt(value)} | |")
        for name, verdict in compared:
            print(f"| outputs {labels[0]} vs {labels[1]}: {name} | | {verdict} | |")
    for t in trees:
        for s in studies:
            stages = [x for x in res[t.label]["studies"][s].get("warm", {}).get("stages_s", []) if x]
            if stages:
                print(
                    f"- {t.label}, warm {s}, stage times (s, median): "
                    + ", ".join(f"{k} {statistics.median(x[k] for x in stages if k in x):.1f}" for k in stages[0])
                )
    print("\nCounts by caller (first study, first repeat):")
    first = next(iter(studies))
    for t in trees:
        st = res[t.label]["studies"][first]
        for mode in ("cold", "warm", "kfp"):
            if mode not in st:
                continue
            callers = st[mode]["counts"][0]["callers"]
            text = "; ".join(
                f"{what}: " + ", ".join(f"{c} {n}" for c, n in sorted(callers[what].items()))
                for what in [*COUNTS, *sorted(set(callers) - set(COUNTS))]
                if what in callers
            )
            print(f"- {t.label}, {mode}: {text or 'nothing counted'}")
            if mode == "kfp":
                for proc in st[mode]["counts"][0]["processes"]:
                    print(f"    task {proc['process']}: {proc['counts']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="source tree to measure (default: this one)")
    ap.add_argument("--baseline-tree", type=Path, default=None, help="measure this tree too, as the baseline")
    ap.add_argument(
        "--study",
        action="append",
        default=None,
        metavar="CASE",
        help="demo study to run (phantom_7_0000, phantom_7_0001, phantom_7_0002; repeatable; default: all three)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement (median shown)")
    ap.add_argument(
        "--eval-cases",
        type=Path,
        default=None,
        help="case folder for `diffugts evaluate --cases` (default: the demo studies' phantom cases)",
    )
    ap.add_argument("--model", default=None, help="model package for both trees (default: each tree's default)")
    ap.add_argument("--skip-cold", action="store_true", help="no cold `diffugts segment` runs")
    ap.add_argument("--skip-warm", action="store_true", help="no warm in-process runs")
    ap.add_argument("--skip-kfp", action="store_true", help="no kfp.local fused pipeline runs")
    ap.add_argument("--skip-evaluate", action="store_true", help="no `diffugts evaluate` run")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for every measured process (default: inherited; torch then uses one "
        "per core). Outputs compared with a run made elsewhere need the same count: the "
        "anomaly scores' float sums depend on it",
    )
    ap.add_argument("--work", type=Path, default=None, help="scratch folder, kept (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write every raw figure here")
    ap.add_argument("--_worker", nargs=3, metavar=("MODE", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        mode, spec, result = args._worker
        Path(result).write_text(json.dumps(WORKERS[mode](json.loads(Path(spec).read_text()))))
        return 0
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    work = (args.work or Path(tempfile.mkdtemp(prefix="study-core-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "hooks").mkdir(exist_ok=True)
    (work / "hooks" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (work / "tmp").mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(work / "tmp")  # kfp.local's scratch folders stay under the work folder
    trees = [Tree(args.baseline_tree, "baseline", work, sys.executable, args.threads)] if args.baseline_tree else []
    trees.append(Tree(args.tree, "new" if args.baseline_tree else "tree", work, sys.executable, args.threads))
    for t in trees:
        if not (t.path / "src" / "diffugts").is_dir():
            ap.error(f"{t.path}: not a diffugts source tree (no src/diffugts)")

    demo = trees[0].worker("info", {"make_studies": str(work / "demo-input")}, "demo-input")["studies"]
    chosen = args.study or sorted(demo)
    unknown = [s for s in chosen if s not in demo]
    if unknown:
        ap.error(f"unknown study {', '.join(unknown)} (demo studies: {', '.join(sorted(demo))})")
    studies = {s: demo[s] for s in chosen}
    eval_cases = (args.eval_cases or work / "demo-input" / "cases").resolve()
    print(f"work folder {work}; studies: " + "; ".join(f"{s} = {st['description']}" for s, st in studies.items()))
    print(f"start: load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs", flush=True)

    res = measure(trees, args, studies, eval_cases)
    compared = compare_trees(trees, res, studies, args) if len(trees) == 2 else []
    report(trees, res, studies, compared, args)
    if args.json:
        args.json.write_text(
            json.dumps({"work": str(work), "studies": studies, "results": res, "compared": compared}, indent=1)
        )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
