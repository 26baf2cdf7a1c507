"""Publishing a study's report folder to the results bucket, manifest last."""

from __future__ import annotations

import os
from pathlib import Path

from diffugts.artifacts.report import MARKER
from diffugts.storage import ObjectStore, join_uri, results_uri
from diffugts.utils.uids import checked_uid


def results_prefix(study_uid: str, base: str | None = None) -> str:
    """``<base>/<StudyInstanceUID>/report``; ``base`` defaults to ``s3://$DIFFUGTS_BUCKET``.
    The UID is header text: refused unless it is a valid UID (see :func:`checked_uid`)."""
    return join_uri(base or results_uri(), checked_uid(study_uid, MARKER), "report")


def upload_report(
    local_dir: str | os.PathLike,
    study_uid: str,
    base: str | None = None,
    store: ObjectStore | None = None,
    meta: dict | None = None,
) -> str:
    """Publish ``local_dir`` (files, then ``_manifest.json``); returns the prefix URI."""
    uri = results_prefix(study_uid, base)
    (store or ObjectStore()).publish_dir(Path(local_dir), uri, meta={"stage": "report", **(meta or {})})
    return uri
