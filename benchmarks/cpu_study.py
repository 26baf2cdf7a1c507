"""One demo study end to end on the CPU: in-process (`diffugts segment`) vs the study pipelines
through `kfp.local`, side by side.

    python benchmarks/cpu_study.py                       # the shipped demo model
    python benchmarks/cpu_study.py --model PKG --repeats 3

The study is a CT phantom of the `make run` demo cohort (seed 7, case 1: kidney lesions that the
demo model finds, so every stage does its full work), written as DICOM once. Every variant
runs the same five stages (ingest, attend, synthesize, refine, report) with the same prompts:

- ``in-process``: the `diffugts segment` command, a fresh process (what a user runs instead
  of the pipeline: torch and MONAI are imported once, the package read once);
- ``warm``: :func:`diffugts.runners.segment.segment` called in this process, imports already done;
- ``kfp staged``: pipelines/study.py, five task processes;
- ``kfp fused``: pipelines/study_fused.py, three task processes (the model stages in one).

Runs alternate and the median of each is compared. Printed: wall time, per-stage time
(warm), peak RSS, and each pipeline's overhead = pipeline / in-process - 1 (per task: process
start, kfp's executor, imports, reading the package; artifact copies between tasks).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.run_local import PROMPTS, demo_studies  # noqa: E402


def peak_rss_gb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024**2  # KiB -> GiB


def in_process_cold(study: Path, out: Path, model: str) -> float:
    import subprocess

    cmd = [sys.executable, "-m", "diffugts", "segment", str(study), "--out", str(out), "--model", model]
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def in_process(study: Path, out: Path, model: str) -> tuple[float, dict]:
    from diffugts.runners.segment import segment

    t0 = time.perf_counter()
    result = segment(str(study), out, PROMPTS, model=model, show_progress=False)
    return time.perf_counter() - t0, result["timings_s"]


def through_kfp_local(study: Path, out: Path, model: str, pipeline) -> float:
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out))
    # The tasks' own logs go to the pipeline root, not the terminal.
    sys.stdout.flush()
    saved = os.dup(1), os.dup(2)
    with open(out.parent / f"{out.name}.log", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            t0 = time.perf_counter()
            pipeline(input_uri=str(study), model_uri=model, prompts=PROMPTS)
            return time.perf_counter() - t0
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model package (default: the shipped demo model)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()

    import logging

    from diffugts.models.defaults import default_model

    logging.disable(logging.WARNING)  # kfp.local logs every task at INFO/WARNING
    warnings.filterwarnings("ignore")
    model = str(Path(args.model or default_model()).resolve())
    work = (args.work or Path(tempfile.mkdtemp(prefix="cpu-study-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(work)  # kfp.local's scratch folders stay under the work folder
    tempfile.tempdir = None
    names = demo_studies(work / "demo-input")
    study = next(Path(p) for p, name in names.items() if "phantom_7_0001" in name)
    print(f"study: {names[str(study)]}; model {model}; torch threads {__import__('torch').get_num_threads()}")

    from pipelines.study import study_pipeline
    from pipelines.study_fused import study_fused_pipeline

    runs: dict[str, list[float]] = {"in-process": [], "warm": [], "kfp staged": [], "kfp fused": []}
    stages = []
    for r in range(args.repeats):
        for name in runs:
            out = work / f"{name.replace(' ', '-')}-{r}"
            if name == "in-process":
                seconds = in_process_cold(study, out, model)
            elif name == "warm":
                seconds, timings = in_process(study, out, model)
                stages.append(timings)
            else:
                pipeline = study_pipeline if name == "kfp staged" else study_fused_pipeline
                seconds = through_kfp_local(study, out, model, pipeline)
            runs[name].append(seconds)
            print(f"run {r}: {name:11s} {seconds:6.1f} s", flush=True)

    med = {name: statistics.median(values) for name, values in runs.items()}
    print(
        f"\npeak RSS: this process {peak_rss_gb(resource.RUSAGE_SELF):.2f} GiB, "
        f"largest child process {peak_rss_gb(resource.RUSAGE_CHILDREN):.2f} GiB"
    )
    base = med["in-process"]
    for name, value in med.items():
        ratio = (
            ""
            if name == "in-process"
            else f"  / in-process = {value / base:.2f} (overhead {100 * (value / base - 1):+.0f}%)"
        )
        print(f"median {name:11s} {value:6.1f} s{ratio}")
    print("warm in-process, per stage:")
    for key in stages[0]:
        print(f"  {key:10s} {statistics.median(s[key] for s in stages):6.1f} s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
