"""`make run`: the cohort pipeline on the embedded demo with kfp.local, offline.

The demo cohort is a few phantom studies (CT with seen and unseen tumor types, and an MR),
written as DICOM under ``--out``/demo-input/studies (one folder per study; the phantoms'
ground truth stays in demo-input/cases). The cohort pipeline runs with
``kfp.local.SubprocessRunner`` in the current virtualenv (no Docker, no cluster), results go
to ``--out``/results, and the script prints where the reports are. A second run skips the
studies already done with the same model and parameters.

Inputs live under ``--out`` rather than in site-packages for a reason: kfp.local's
SubprocessRunner rewrites every "python3" in a task's arguments to the interpreter path,
parameter values included, which mangles paths inside a virtualenv (.../lib/python3.11/...).
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

PROMPTS = ["liver tumor", "kidney tumor", "pancreas tumor", "spleen lesion"]
# The demo cohort: phantom studies from a seed that training and evaluation never use.
DEMO_SEED = 7
DEMO_CASES: list[dict[str, Any]] = [
    {"index": 0, "modality": "CT", "split": "unseen"},  # tumor types the heads never saw
    {"index": 1, "modality": "CT", "split": "seen"},
    {"index": 2, "modality": "MR", "mr_contrast": "T2", "split": "any"},  # unseen modality
]


def demo_studies(folder: Path) -> dict[str, str]:
    """Write the demo phantom studies as DICOM (once); returns {study folder: description}."""
    from diffugts.phantom import CaseSpec, generate_case, write_case

    names = {}
    for entry in DEMO_CASES:
        spec = CaseSpec(seed=DEMO_SEED, healthy_fraction=0.0, **entry)
        case_dir, study_dir = folder / "cases" / spec.case_id, folder / "studies" / spec.case_id
        if not (case_dir / "case.json").exists():
            write_case(generate_case(spec), folder / "cases")
        if not study_dir.exists():
            shutil.copytree(case_dir / "dicom", study_dir)
        lesions = json.loads((case_dir / "case.json").read_text())["lesions"]
        found = ", ".join(sorted({les["organ"] + " " + les["type"] for les in lesions})) or "healthy"
        names[str(study_dir.resolve())] = f"{spec.case_id} ({spec.render_modality}, {found})"
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("local_outputs"), help="where runs are written")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    # kfp.local leaves scratch folders in the temp dir: keep them under --out and remove them.
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=out))
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = None

    import warnings

    from kfp import local

    from diffugts.models.defaults import default_model
    from diffugts.runners import cohort
    from pipelines.cohort import cohort_pipeline

    model = str(Path(default_model()).resolve())
    # The local runner warns that Kubernetes settings (limits, images) do not apply to it.
    warnings.filterwarnings("ignore", module=r"kfp\.local(\..*)?$")
    names = demo_studies(out / "demo-input")
    results = out / "results"
    # A failed study is recorded by its batch and the run goes on; the reports are read from results/ below.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp"), raise_on_error=False)
    # kfp.local indents task logs by swapping builtins.print per task; parallel loop iterations
    # restore it out of order and leave it indented: put the real one back afterwards.
    real_print = builtins.print
    try:
        cohort_pipeline(
            studies_uri=str(out / "demo-input" / "studies"), model_uri=model, results_uri=str(results), prompts=PROMPTS
        )
    finally:
        builtins.print = real_print
        shutil.rmtree(scratch, ignore_errors=True)

    runs = sorted((results / cohort.RUNS).glob("cohort-*.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        print("the cohort run left no record: see the log above", file=sys.stderr)
        return 1
    record = json.loads(runs[-1].read_text())
    print(
        f"\nModel: {model}\nPrompts: {', '.join(PROMPTS)}\nRun {record['run']}: {record['state']}, "
        f"{record['processed']} processed, {record['skipped']} skipped (done before)\n\nStudies:"
    )
    for uri, name in names.items():
        marker_path = Path(cohort.marker_uri(str(results), cohort.study_key(uri)))
        marker = json.loads(marker_path.read_text()) if marker_path.exists() else {"status": "", "reason": "not run"}
        print(f"  {name}")
        if marker["status"] != "done":
            print(f"    failed: {marker['reason']}")
            continue
        summary = json.loads((Path(marker["result"]) / "report.json").read_text())
        found = ", ".join(
            f"{t['text']}: {len(t['lesion_ids'])} lesion(s), {t['total_volume_ml']:.1f} mL" for t in summary["targets"]
        )
        print(f"    found:  {found}\n    report: {Path(marker['result']) / 'report.html'}")
    if record["report"]:
        print(
            f"\nCohort report: {Path(record['report']) / 'cohort.html'}\n"
            f"               {Path(record['report']) / 'cohort.csv'}"
        )
    return 0 if cohort.run_succeeded(record["state"]) else 1


if __name__ == "__main__":
    sys.exit(main())
