"""Ingestion straight from an S3 prefix (a real SeaweedFS server with authentication)."""

from __future__ import annotations

import json
import uuid
import zipfile

from dicomfactory import write_series
from diffugts.cli import main
from diffugts.storage import ObjectStore


def test_ingest_from_s3_prefix_and_zip(s3_env, tmp_path, capsys):
    files = write_series(tmp_path / "study", n=5)
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    store = ObjectStore()
    prefix = f"s3://{s3_env.bucket}/ingest-{uuid.uuid4().hex[:8]}/study"
    store.upload_dir(tmp_path / "study", prefix)

    assert main(["ingest", prefix, "--out", str(tmp_path / "out")]) == 0
    series = json.loads((tmp_path / "out" / "series.json").read_text())
    assert series["input"] == prefix
    assert series["volume"]["size_ijk"] == [10, 12, 5]
    assert sorted(i["file"] for i in series["instances"]) == sorted(f.name for f in files)
    rejections = json.loads((tmp_path / "out" / "rejections.json").read_text())["rejections"]
    assert [r["file"] for r in rejections] == ["notes.txt"]

    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f.name)
    store.upload_file(archive, f"{prefix}-zip/study.zip")
    assert main(["-q", "ingest", f"{prefix}-zip/study.zip", "--out", str(tmp_path / "out-zip")]) == 0
    assert json.loads((tmp_path / "out-zip" / "series.json").read_text())["volume"]["size_ijk"] == [10, 12, 5]
    capsys.readouterr()


def test_missing_s3_prefix_and_credentials(s3_env, tmp_path, capsys, monkeypatch):
    missing = f"s3://{s3_env.bucket}/nothing-here-{uuid.uuid4().hex[:8]}/"
    assert main(["ingest", missing, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffugts: error: ") and "nothing-here" in err[0]

    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(["ingest", missing, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AWS_SECRET_ACCESS_KEY" in err[0]
