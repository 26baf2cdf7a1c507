"""`make run`: the study pipeline on the embedded demo with kfp.local, offline.

The demo cohort is a few phantom studies (CT with seen and unseen tumor types, and an MR),
written as DICOM under ``--out``/demo-input. Every study runs through the pipeline with
``kfp.local.SubprocessRunner`` in the current virtualenv (no Docker, no cluster); the
script prints where the outputs are.

Inputs live under ``--out`` rather than in site-packages for a reason: kfp.local's
SubprocessRunner rewrites every "python3" in a task's arguments to the interpreter path,
parameter values included, which mangles paths inside a virtualenv (.../lib/python3.11/...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


PROMPTS = ["liver tumor", "kidney tumor", "pancreas tumor", "spleen lesion"]
# The demo cohort: phantom studies from a seed that training and evaluation never use.
DEMO_SEED = 7
DEMO_CASES = [
    {"index": 0, "modality": "CT", "split": "unseen"},  # tumor types the heads never saw
    {"index": 1, "modality": "CT", "split": "seen"},
    {"index": 2, "modality": "MR", "mr_contrast": "T2", "split": "any"},  # unseen modality
]


def demo_studies(folder: Path) -> list[dict]:
    """Write the demo phantom studies as DICOM (once) and return their pipeline inputs."""
    from diffugts.phantom import CaseSpec, generate_case, write_case

    folder.mkdir(parents=True, exist_ok=True)
    studies = []
    for entry in DEMO_CASES:
        spec = CaseSpec(seed=DEMO_SEED, healthy_fraction=0.0, **entry)
        case_dir = folder / spec.case_id
        if not (case_dir / "case.json").exists():
            write_case(generate_case(spec), folder)
        lesions = json.loads((case_dir / "case.json").read_text())["lesions"]
        studies.append({
            "name": f"{spec.case_id} ({spec.render_modality}, "
                    f"{', '.join(sorted({l['organ'] + ' ' + l['type'] for l in lesions})) or 'healthy'})",
            "input_uri": str(case_dir / "dicom"),
        })
    return studies


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

    model = str(Path(default_model()).resolve())
    # The local runner warns that Kubernetes settings (limits, images) do not apply to it.
    warnings.filterwarnings("ignore", module=r"kfp\.local(\..*)?$")

    from pipelines.study import study_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp"))
    results = []
    try:
        for study in demo_studies(out / "demo-input"):
            print(f"\n=== study pipeline: {study['name']} ===", flush=True)
            task = study_pipeline(input_uri=study["input_uri"], model_uri=model, prompts=PROMPTS)
            results.append((study["name"], Path(task.outputs["Output"].path)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\nModel: {model}\nPrompts: {', '.join(PROMPTS)}\n\nReports:")
    for name, report_dir in results:
        summary = json.loads((report_dir / "report.json").read_text())
        found = ", ".join(f"{t['text']}: {len(t['lesion_ids'])} lesion(s), {t['total_volume_ml']:.1f} mL"
                          for t in summary["targets"])
        print(f"  {name}")
        print(f"    found:  {found}")
        print(f"    report: {report_dir / 'report.html'}")
        print(f"    DICOM:  {', '.join(str(report_dir / f) for f in ('seg.dcm', 'sr.dcm') if (report_dir / f).exists())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
