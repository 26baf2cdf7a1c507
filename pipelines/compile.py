"""Compile the pipelines to KFP IR YAML: `python -m pipelines.compile --out build/pipelines`."""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from pipelines.study import study_pipeline

PIPELINES = {"diffugts-study": study_pipeline}


def compile_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, pipeline in PIPELINES.items():
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("build/pipelines"))
    args = ap.parse_args()
    for path in compile_all(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
