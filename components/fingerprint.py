"""Kubeflow component: content fingerprints of the study and the model (never cached).

KFP keys its cache on a task's input values, not on what a URI points to. The study pipelines
pass these fingerprints to every cached task that reads the study or the model, so a study
re-exported under the same folder, or a model replaced under the same prefix, misses the cache
instead of being served the old results (see diffugts.utils.fingerprint).
"""

from typing import NamedTuple

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fingerprint(  # kfp reads the outputs from this NamedTuple form, which type checkers do not accept
    input_uri: str, model_uri: str
) -> NamedTuple("Fingerprints", study_sha256=str, model_sha256=str):  # type: ignore[valid-type]
    """sha256 fingerprints of the study input's files and of the model package's manifest.

    Args:
        input_uri: DICOM folder, .zip, or s3://bucket/prefix (S3 settings from the environment).
        model_uri: Model package folder or s3:// prefix.
    """
    import sys
    from collections import namedtuple

    from diffugts.errors import DiffugtsError
    from diffugts.utils.fingerprint import model_sha256, study_sha256

    try:
        study, model = study_sha256(input_uri), model_sha256(model_uri)
    except DiffugtsError as err:
        print(f"diffugts: error: {err}", file=sys.stderr)
        sys.exit(2)
    return namedtuple("Fingerprints", ["study_sha256", "model_sha256"])(study, model)  # type: ignore[call-arg]
