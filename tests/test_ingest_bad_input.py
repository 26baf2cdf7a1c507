"""Bad input: one line naming the file and the reason, exit 2, no traceback, nothing that
looks like a complete study artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RTStructureSetStorage

from dicomfactory import write_series
from diffugts.cli import main


def run_cli(capsys, *args) -> tuple[int, list[str], str]:
    code = main(["ingest", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def assert_clean_failure(code, err, out_dir: Path, *fragments):
    assert code == 2
    errors = [line for line in err if line.startswith("diffugts: error:")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not (out_dir / "series.json").exists()
    assert not (out_dir / "volume.nii").exists()
    assert (out_dir / "rejections.json").exists()
    return errors[0]


def test_missing_input(tmp_path, capsys):
    code, err, _ = run_cli(capsys, tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 2 and err == [f"diffugts: error: {tmp_path / 'nope'}: no such file or folder"]


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err, _ = run_cli(capsys, tmp_path / "empty", "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(tmp_path / "empty"), "no files found")


def test_only_non_dicom(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("hello")
    (tmp_path / "in" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    code, err, _ = run_cli(capsys, tmp_path / "in", "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "no DICOM files")


def test_non_dicom_and_truncated_files_among_good_ones_are_skipped(tmp_path, capsys, caplog):
    files = write_series(tmp_path / "in", n=8)
    (tmp_path / "in" / "readme.txt").write_text("not an image")
    # A truncated copy of the last slice (the rest of the series stays regular).
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[: len(data) - 50])
    code, err, out = run_cli(capsys, tmp_path / "in", "--out", tmp_path / "out")
    assert code == 0
    assert "7 slices" in out
    assert "skipped readme.txt: not a DICOM file" in caplog.text
    assert f"skipped {files[-1].name}: pixel data truncated" in caplog.text
    rejections = json.loads((tmp_path / "out" / "rejections.json").read_text())["rejections"]
    assert {r["kind"] for r in rejections} == {"not_dicom", "truncated"}
    assert (tmp_path / "out" / "series.json").exists()


def test_truncated_header(tmp_path, capsys):
    files = write_series(tmp_path / "in", n=1)
    files[0].write_bytes(files[0].read_bytes()[:300])
    code, err, _ = run_cli(capsys, files[0], "--out", tmp_path / "out", "--rules", "permissive")
    assert_clean_failure(code, err, tmp_path / "out", str(files[0]))


def test_corrupt_compressed_pixel_data_names_the_file(tmp_path, capsys):
    def tweak(k, ds):
        if k == 2:
            ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])  # J2K marker, then garbage
            ds["PixelData"].VR = "OB"

    files = write_series(tmp_path / "in", tweak=tweak, shuffle=False)
    code, err, _ = run_cli(capsys, tmp_path / "in", "--out", tmp_path / "out")
    line = assert_clean_failure(code, err, tmp_path / "out", files[2].name, "cannot decode pixel data")
    assert "JPEG 2000" in line


def test_absurd_dimensions_are_refused_before_decoding(tmp_path, capsys):
    def tweak(k, ds):
        ds.Rows = ds.Columns = 16000
        ds.NumberOfFrames = 1

    files = write_series(tmp_path / "in", n=1, tweak=tweak)
    code, err, _ = run_cli(capsys, files[0], "--out", tmp_path / "out", "--rules", "permissive")
    assert_clean_failure(code, err, tmp_path / "out", str(files[0]), "pixel data truncated")


def test_memory_guard(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUGTS_MAX_VOLUME_GB", "0.000001")  # ~250 float32 voxels
    write_series(tmp_path / "in")
    code, err, _ = run_cli(capsys, tmp_path / "in", "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "exceeds the memory limit")


def test_unsupported_sop_class(tmp_path, capsys):
    def tweak(k, ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage

    files = write_series(tmp_path / "in", n=1, tweak=tweak)
    code, err, _ = run_cli(capsys, files[0], "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "unsupported SOP class: RT Structure Set Storage")


def test_failure_removes_a_stale_artifact(tmp_path, capsys):
    write_series(tmp_path / "good")
    ingest_out = tmp_path / "out"
    assert main(["ingest", str(tmp_path / "good"), "--out", str(ingest_out)]) == 0
    assert (ingest_out / "series.json").exists()
    (tmp_path / "bad").mkdir()
    code, err, _ = run_cli(capsys, tmp_path / "bad", "--out", ingest_out)
    assert_clean_failure(code, err, ingest_out, "no files found")
    assert not (ingest_out / "headers").exists()


def test_zip_input_and_zip_slip_guard(tmp_path, capsys):
    files = write_series(tmp_path / "in")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f"study/{f.name}")
    code, _, out = run_cli(capsys, archive, "--out", tmp_path / "out")
    assert code == 0 and "6 slices" in out
    series = json.loads((tmp_path / "out" / "series.json").read_text())
    assert all(i["file"].startswith("study/") for i in series["instances"])

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.dcm", b"x")
    code, err, _ = run_cli(capsys, evil, "--out", tmp_path / "out2")
    assert code == 2 and "unsafe member path" in err[-1]
    assert not (tmp_path.parent / "escape.dcm").exists()


def test_corrupt_zip(tmp_path, capsys):
    archive = tmp_path / "broken.zip"
    files = write_series(tmp_path / "in", n=3)
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f.name)
    data = archive.read_bytes()
    archive.write_bytes(data[:200] + bytes(300) + data[500:])  # damage the first member
    code, err, _ = run_cli(capsys, archive, "--out", tmp_path / "out")
    assert code == 2 and str(archive) in err[-1]


def test_console_script_prints_no_traceback(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.dcm").write_bytes(b"DICM" * 10)
    exe = Path(sys.executable).parent / "diffugts"
    proc = subprocess.run(
        [str(exe), "ingest", str(tmp_path / "in"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "DIFFUGTS_DEBUG": ""},
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("diffugts: error: ")


@pytest.mark.parametrize(
    "rules, message",
    [
        ('{"selections": []}', 'non-empty "selections"'),
        ('{"selections": [{"conditions": {"Modaltiy": "CT"}}]}', "unknown attribute 'Modaltiy'"),
        ('{"selections": [{"conditions": {"Modality": "(CT"}}]}', "bad regular expression"),
        ("not json", "not a JSON rules file"),
    ],
)
def test_bad_rules_file(tmp_path, capsys, rules, message):
    write_series(tmp_path / "in")
    (tmp_path / "rules.json").write_text(rules)
    code, err, _ = run_cli(capsys, tmp_path / "in", "--out", tmp_path / "out", "--rules", tmp_path / "rules.json")
    assert code == 2 and len(err) == 1 and message in err[0] and "rules.json" in err[0]


def test_header_copy_is_the_source_header(tmp_path):
    files = write_series(tmp_path / "in", n=3, shuffle=False)
    assert main(["-q", "ingest", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    series = json.loads((tmp_path / "out" / "series.json").read_text())
    for inst, src in zip(series["instances"], files):
        copy = pydicom.dcmread(tmp_path / "out" / inst["header"])
        orig = pydicom.dcmread(src)
        del orig.PixelData
        assert copy == orig
    np.testing.assert_equal(len(series["instances"]), 3)
