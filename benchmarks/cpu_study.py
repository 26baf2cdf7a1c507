"""One demo study end to end on the CPU: in-process (`diffugts segment`) vs the study pipeline
through `kfp.local`, side by side in the same process.

    python benchmarks/cpu_study.py                       # the shipped demo model
    python benchmarks/cpu_study.py --model PKG --repeats 3

The study is a CT phantom of the `make run` demo cohort (seed 7, case 1: kidney lesions that the
demo model finds, so every stage does its full work), written as DICOM
once. Both variants run the same five stages (ingest, attend, synthesize, refine, report)
with the same prompts; runs alternate (in-process, pipeline, in-process, ...) and the
median of each is compared. Printed per variant: wall time, per-stage time (in-process),
peak RSS (in-process: this process; pipeline: the largest task subprocess), and the
pipeline's overhead = pipeline / in-process - 1 (process start-up, imports and model
loading per task, artifact copies between tasks).
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
    return resource.getrusage(who).ru_maxrss / 1024 ** 2  # KiB -> GiB


def in_process(study: Path, out: Path, model: str) -> tuple[float, dict]:
    from diffugts.segment import segment

    t0 = time.perf_counter()
    result = segment(str(study), out, PROMPTS, model=model, show_progress=False)
    return time.perf_counter() - t0, result["timings_s"]


def through_kfp_local(study: Path, out: Path, model: str) -> float:
    from kfp import local

    from pipelines.study import study_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out))
    # The tasks' own logs go to the pipeline root, not the terminal.
    sys.stdout.flush()
    saved = os.dup(1), os.dup(2)
    with open(out.parent / f"{out.name}.log", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            t0 = time.perf_counter()
            study_pipeline(input_uri=str(study), model_uri=model, prompts=PROMPTS)
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

    inproc, pipeline, stages = [], [], []
    for r in range(args.repeats):
        seconds, timings = in_process(study, work / f"inproc-{r}", model)
        inproc.append(seconds)
        stages.append(timings)
        print(f"run {r}: in-process {seconds:6.1f} s  " + "  ".join(f"{k} {v:.1f}" for k, v in timings.items()),
              flush=True)
        seconds = through_kfp_local(study, work / f"kfp-{r}", model)
        pipeline.append(seconds)
        print(f"run {r}: kfp.local  {seconds:6.1f} s", flush=True)

    a, b = statistics.median(inproc), statistics.median(pipeline)
    print(f"\nmedian in-process {a:.1f} s (peak RSS {peak_rss_gb(resource.RUSAGE_SELF):.2f} GiB)")
    print(f"median kfp.local  {b:.1f} s (largest task peak RSS {peak_rss_gb(resource.RUSAGE_CHILDREN):.2f} GiB)")
    print(f"kfp.local / in-process = {b / a:.2f} (overhead {100 * (b / a - 1):.0f}%)")
    for key in stages[0]:
        print(f"  {key:10s} {statistics.median(s[key] for s in stages):6.1f} s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
