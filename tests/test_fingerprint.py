"""Content fingerprints of studies and models (diffugts.utils.fingerprint): what the pipelines put
into the cache keys of the tasks that read them (tests/test_pipelines.py checks the wiring)."""

from __future__ import annotations

import json
import uuid
import zipfile

import pytest

from diffugts.errors import InputError
from diffugts.utils.fingerprint import model_sha256, study_sha256


def _study(folder, payload: bytes = b"slice two"):
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "a.dcm").write_bytes(b"slice one")
    (folder / "sub" / "b.dcm").write_bytes(payload)
    return folder


def test_local_study_fingerprint_follows_the_content(tmp_path):
    first = study_sha256(str(_study(tmp_path / "s")))
    assert study_sha256(str(tmp_path / "s")) == first
    assert study_sha256(str(_study(tmp_path / "copy"))) == first  # the content, not the path
    _study(tmp_path / "s", b"slice TWO")  # re-exported: same names, same size, other bytes
    assert study_sha256(str(tmp_path / "s")) != first
    (tmp_path / "s" / "sub" / "b.dcm").rename(tmp_path / "s" / "b.dcm")
    assert len({first, study_sha256(str(tmp_path / "s"))}) == 2
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        zf.writestr("a.dcm", b"slice one")
    zipped = study_sha256(str(tmp_path / "s.zip"))
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        zf.writestr("a.dcm", b"slice 1")
    assert study_sha256(str(tmp_path / "s.zip")) != zipped
    with pytest.raises(InputError, match="no such file or folder"):
        study_sha256(str(tmp_path / "missing"))


def test_model_fingerprint_is_the_manifest_hash(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"files": {"w.safetensors": {"sha256": "aa"}}}))
    before = model_sha256(str(tmp_path / "m"))
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"files": {"w.safetensors": {"sha256": "bb"}}}))
    assert model_sha256(str(tmp_path / "m")) != before


def test_s3_study_fingerprint_follows_the_content(s3_env, tmp_path):
    from diffugts.storage import ObjectStore

    store = ObjectStore()
    prefix = f"s3://{s3_env.bucket}/fingerprint-{uuid.uuid4().hex[:8]}/study"
    store.upload_dir(_study(tmp_path / "s"), prefix)
    first = study_sha256(prefix)
    assert study_sha256(prefix + "/") == first
    store.upload_dir(_study(tmp_path / "s", b"slice TWO"), prefix)
    assert study_sha256(prefix) != first
    store.upload_file(tmp_path / "s" / "a.dcm", f"{prefix}-zip/study.zip")
    zipped = study_sha256(f"{prefix}-zip/study.zip")
    store.upload_file(tmp_path / "s" / "sub" / "b.dcm", f"{prefix}-zip/study.zip")
    assert study_sha256(f"{prefix}-zip/study.zip") != zipped
    with pytest.raises(InputError, match="no objects"):
        study_sha256(f"s3://{s3_env.bucket}/nothing-{uuid.uuid4().hex[:8]}/")
