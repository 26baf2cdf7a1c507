"""Compile the pipelines: `python -m pipelines.compile` (`make compile`).

Writes, per pipeline:
- ``build/pipelines/<name>.yaml``: KFP IR YAML, to upload through the KFP API / UI;
- ``manifests/base/pipelines/<name>.yaml``: Kubernetes-native ``Pipeline`` + ``PipelineVersion``
  objects (KFP in Kubernetes-native API mode), listed under ``resources:`` of that directory's
  kustomization.yaml. These are committed; tests/test_pipelines.py fails when they are stale.

Images (DIFFUGTS_CPU_IMAGE / DIFFUGTS_GPU_IMAGE) are read at import time and baked into the
output. Each PipelineVersion is named after the release and the
hash of its spec (``version_name``), so a spec that changes gets a new version name;
``--version-names`` prints them (for uploads through the KFP API, docs/deployment.md).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import tempfile
from pathlib import Path

from kfp import compiler
from kfp.compiler import KubernetesManifestOptions

from components.images import VERSION
from pipelines.cohort import cohort_pipeline
from pipelines.protocol import protocol_pipeline
from pipelines.study import study_pipeline
from pipelines.study_fused import study_fused_pipeline

PIPELINES = {
    "diffugts-study": study_pipeline,
    "diffugts-study-fused": study_fused_pipeline,
    "diffugts-cohort": cohort_pipeline,
    "diffugts-protocol": protocol_pipeline,
}
NAMESPACE = "diffugts"
REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests" / "base" / "pipelines"
# kubectl apply (client-side) keeps a copy of each object in an annotation of at most 256 KiB.
MAX_MANIFEST_BYTES = 200 * 1024


def spec_digest(pipeline) -> str:
    """sha256 of the pipeline's compiled IR (images, parallelism and every default included)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "pipeline.yaml")
        compiler.Compiler().compile(pipeline, str(path))
        return hashlib.sha256(path.read_bytes()).hexdigest()


def version_name(name: str, digest: str) -> str:
    """``<pipeline>-<release>-<first 10 hex digits of the spec's sha256>``: a changed spec gets a
    new name (KFP rejects a changed spec under an existing PipelineVersion name: the spec is
    immutable), an unchanged one keeps it, so `kubectl apply` in CI is idempotent."""
    return f"{name}-{VERSION.replace('.', '-')}-{digest[:10]}"


def compile_all(out: Path) -> list[Path]:
    """KFP IR YAML of every pipeline into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, pipeline in PIPELINES.items():
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        paths.append(path)
    return paths


def compile_manifests(out: Path = MANIFESTS) -> list[Path]:
    """Pipeline + PipelineVersion manifests of every pipeline into ``out``, and the file names
    into the ``resources:`` list of ``out/kustomization.yaml``."""
    paths = []
    for name, pipeline in PIPELINES.items():
        path = out / f"{name}.yaml"
        options = KubernetesManifestOptions(
            namespace=NAMESPACE,
            pipeline_name=name,
            pipeline_version_name=version_name(name, spec_digest(pipeline)),
            include_pipeline_manifest=True,
        )
        compiler.Compiler().compile(
            pipeline, str(path), kubernetes_manifest_format=True, kubernetes_manifest_options=options
        )
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise SystemExit(f"{path}: {path.stat().st_size} bytes, too large for `kubectl apply`")
        paths.append(path)
    kustomization = out / "kustomization.yaml"
    text = kustomization.read_text()
    listed = "resources:\n" + "".join(f"  - {p.name}\n" for p in paths)
    # Only the resources list is ours: the comments and settings around it stay as written.
    new = re.sub(r"^resources:.*?(?=^\S|\Z)", listed, text, count=1, flags=re.S | re.M)
    if new == text and listed not in text:
        raise SystemExit(f"{kustomization}: no resources: list to update")
    kustomization.write_text(new)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/pipelines"), help="where the IR YAML goes")
    ap.add_argument("--manifests", type=Path, default=MANIFESTS, help="where the Kubernetes manifests go")
    ap.add_argument(
        "--version-names",
        action="store_true",
        help="only print '<pipeline> <version name>' per pipeline, write nothing",
    )
    args = ap.parse_args()
    if args.version_names:
        for name, pipeline in PIPELINES.items():
            print(name, version_name(name, spec_digest(pipeline)))
        return
    for path in compile_all(args.out) + compile_manifests(args.manifests):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
