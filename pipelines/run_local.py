"""`make run`: the study pipeline on the embedded demo with kfp.local, offline.

Runs every demo study through the pipeline with ``kfp.local.SubprocessRunner`` in the
current virtualenv (no Docker, no cluster) and prints where the outputs are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def demo_studies(folder: Path) -> list[dict]:
    """Real DICOM that ships in pip packages: pydicom's and pydicom-data's test files.

    They are copied under ``folder`` first: kfp.local's SubprocessRunner rewrites every
    "python3" in a task's arguments to the interpreter path, parameter values included,
    which mangles paths inside a virtualenv (.../lib/python3.11/...).
    """
    from pydicom.data import get_testdata_file

    def data(name: str) -> Path:
        path = get_testdata_file(name, download=False)
        if not path:
            sys.exit(f"demo data {name} not found: is pydicom-data installed? (make venv)")
        return Path(path)

    folder.mkdir(parents=True, exist_ok=True)
    ct_study = folder / "ct-study-folder"
    if not ct_study.exists():
        shutil.copytree(data("CT_small.dcm").parent / "dicomdirtests", ct_study)
    mr = folder / "enhanced-mr.dcm"
    if not mr.exists():
        shutil.copyfile(data("emri_small_jpeg_2k_lossless.dcm"), mr)
    return [
        # A study folder from a DICOMDIR test set: localizers, CR, broken series, one CT volume.
        {"name": "ct-study-folder", "input_uri": str(ct_study), "rules": "default"},
        # An Enhanced MR multi-frame instance (no plane positions: permissive rules).
        {"name": "enhanced-mr", "input_uri": str(mr), "rules": "permissive"},
    ]


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

    # The local runner warns that Kubernetes settings (limits, images) do not apply to it.
    warnings.filterwarnings("ignore", module=r"kfp\.local(\..*)?$")

    from pipelines.study import study_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp"))
    results = []
    try:
        for study in demo_studies(out / "demo-input"):
            print(f"\n=== study pipeline: {study['name']} ===", flush=True)
            task = study_pipeline(input_uri=study["input_uri"], rules=study["rules"])
            study_dir = Path(task.outputs["Output"].path)
            series = json.loads((study_dir / "series.json").read_text())
            results.append((study["name"], study_dir, series))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("\nOutputs:")
    for name, study_dir, series in results:
        v = series["volume"]
        print(f"  {name}: {series['series_label']}, {'x'.join(map(str, v['size_ijk']))} voxels")
        print(f"    study artifact: {study_dir}")
        print(f"    volume:         {study_dir / v['file']}")
        print(f"    decisions:      {study_dir / 'series.json'}, {study_dir / 'rejections.json'}")
        print(f"    summary:        {study_dir.parent / 'summary'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
