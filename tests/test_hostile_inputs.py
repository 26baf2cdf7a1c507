"""The hostile-input corpus (issue #23): crafted DICOM, zips and output paths, each made here,
small, run through `diffugts ingest` in a child process with an address-space limit.

Every case ends with exit 2 and one line (no traceback), or with a documented acceptance;
nothing is written outside --out (the child's TMPDIR and working folder are checked too),
peak RSS stays far below the machine's, and no artifact is left looking complete.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from dicomfactory import write_series

# Each case runs `diffugts ingest` in a child process (about 1 s each on 2 CPU cores, 30 s in all).
pytestmark = pytest.mark.slow

LIMIT_AS = 3 * 2**30  # address space of the child: a runaway allocation fails fast, not the machine
MAX_RSS_MIB = 1024  # what a case may use at peak
# Peak RSS from VmHWM: getrusage's ru_maxrss survives fork + exec, so it would report the
# pytest process's own peak (over 1 GiB once models are loaded), not the child's.
RUNNER = (
    "import re, sys\n"
    "from diffugts.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)\n"
    "print(f'peak_rss_kib={hwm}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _limits(fsize: int | None):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))
        if fsize is not None:  # a full disk, as far as the child can tell (EFBIG on write)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return apply


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def run_ingest(
    tmp_path: Path, src, out, *extra, env: dict | None = None, fsize: int | None = None, timeout: float = 60
) -> tuple[int, list[str], float]:
    """(exit code, stderr lines without the RSS line, seconds); checks RSS and stray writes."""
    scratch, cwd = tmp_path / "child-tmp", tmp_path / "child-cwd"
    scratch.mkdir(exist_ok=True)
    cwd.mkdir(exist_ok=True)
    before = _tree(tmp_path)
    child_env = {
        **os.environ,
        "TMPDIR": str(scratch),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        **(env or {}),
    }
    child_env.pop("DIFFUGTS_DEBUG", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, "-q", "ingest", os.fsencode(src), "--out", os.fsencode(out), *extra],
        capture_output=True,
        env=child_env,
        cwd=cwd,
        timeout=timeout,
        preexec_fn=_limits(fsize),
    )
    elapsed = time.monotonic() - start
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    rss = [int(line.split("=")[1]) for line in err if line.startswith("peak_rss_kib=")]
    assert rss, err[-30:]  # the child ended normally (no abort, no kill)
    assert rss[0] / 1024 < MAX_RSS_MIB, f"peak RSS {rss[0] / 1024:.0f} MiB"
    new = _tree(tmp_path) - before
    out_text = os.fsdecode(out) if isinstance(out, bytes) else str(out)
    stray = [p for p in new if not p.startswith(out_text) and not p.startswith(str(cwd))]
    assert not stray, stray
    assert not list(scratch.iterdir()) and not list(cwd.iterdir())
    return proc.returncode, [line for line in err if not line.startswith("peak_rss_kib=")], elapsed


def assert_refused(code: int, err: list[str], out: Path | None, *fragments: str) -> str:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("diffugts: error:"), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    if out is not None:
        assert not (out / "series.json").exists() and not (out / "volume.nii").exists()
        assert not list(out.parent.glob(".*.partial"))
    return err[0]


# -- crafted DICOM ---------------------------------------------------------------------------


def _one(folder: Path, **kw) -> Path:
    (path,) = write_series(folder, n=1, **kw)
    return path


def _rle_bomb(path: Path, frames: int = 100_000_000) -> None:
    """1x1 RLE frames, declared 1e8 times: a 1-2 KB file."""
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 1
    ds.PixelData = np.zeros((1, 1), np.int16).tobytes()
    ds.compress(RLELossless)
    ds.NumberOfFrames = frames
    ds.save_as(path)


def test_rle_frame_count_bomb_is_refused_before_decoding(tmp_path):
    path = _one(tmp_path / "in")
    _rle_bomb(path)
    assert path.stat().st_size < 4096
    code, err, _ = run_ingest(tmp_path, path, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", path.name, "frames")


def test_too_many_frames_for_the_frame_limit(tmp_path):
    path = _one(tmp_path / "in", rows=2, cols=2)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 40
    ds.PixelData = np.zeros((40, 2, 2), np.int16).tobytes()
    ds.save_as(path)
    code, err, _ = run_ingest(tmp_path, path, tmp_path / "out", env={"DIFFUGTS_MAX_FRAMES": "30"})
    assert_refused(code, err, tmp_path / "out", "40 frames", "DIFFUGTS_MAX_FRAMES")


def test_corrupt_compressed_pixels_are_one_line(tmp_path):
    folder = tmp_path / "in"
    paths = write_series(folder, n=4)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        ds.PixelData = encapsulate([b"\x07" + b"\xff" * 70])  # an RLE header that lies
        ds.save_as(p)
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out")
    line = assert_refused(code, err, tmp_path / "out", "decode")
    assert len(line) < 600


@pytest.mark.parametrize("ts", ["1.2.3.4.5.6.7.8.999", "", "not-a-uid"])
def test_a_file_with_a_bogus_transfer_syntax_is_skipped(tmp_path, ts):
    folder = tmp_path / "in"
    paths = write_series(folder, n=5)
    bad = pydicom.dcmread(paths[-1])  # the last slice: the others stay a regular grid
    bad.file_meta.TransferSyntaxUID = ts
    bad.save_as(paths[-1], enforce_file_format=False)
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out", "--rules", "permissive")
    assert code == 0, err
    rejections = json.loads((tmp_path / "out" / "rejections.json").read_text())["rejections"]
    (skipped,) = [r for r in rejections if "file" in r]
    assert skipped["file"] == paths[-1].name and "transfer syntax" in skipped["reason"]
    series = json.loads((tmp_path / "out" / "series.json").read_text())
    assert series["volume"]["size_ijk"][2] == 4  # the other slices
    # Alone, the same file is refused with one line.
    code, err, _ = run_ingest(tmp_path, paths[-1], tmp_path / "out2")
    assert_refused(code, err, tmp_path / "out2", paths[-1].name, "transfer syntax")


@pytest.mark.parametrize("spacing", [(0.0, 0.7), (-0.8, 0.7), (1e-30, 1e-30), (1e30, 1.0)])
def test_invalid_pixel_spacing_is_refused(tmp_path, spacing):
    folder = tmp_path / "in"
    write_series(folder, n=4, pixel_spacing=spacing)
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "Pixel Spacing")


def test_invalid_pixel_spacing_accepted_by_rules_is_noted(tmp_path):
    folder = tmp_path / "in"
    write_series(folder, n=4, pixel_spacing=(0.0, 0.7))
    rules = {"selections": [{"name": "any", "conditions": {"Modality": "^CT$"}}], "invalid_pixel_spacing": "assume_1mm"}
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out", "--rules", json.dumps(rules))
    assert code == 0, err
    series = json.loads((tmp_path / "out" / "series.json").read_text())
    assert series["volume"]["spacing_mm"][:2] == [1.0, 1.0]
    assert any("Pixel Spacing" in n for n in series["notes"])


@pytest.mark.parametrize("sbs", [-2.0, 0.0, 1e-30])
def test_single_slice_with_bad_spacing_between_slices(tmp_path, sbs):
    path = _one(tmp_path / "in", tweak=lambda k, ds: setattr(ds, "SpacingBetweenSlices", sbs))
    code, err, _ = run_ingest(tmp_path, path, tmp_path / "out", "--rules", "permissive")
    assert code == 0, err  # documented: a bad third spacing of one slice is ignored (1 mm, noted)
    series = json.loads((tmp_path / "out" / "series.json").read_text())
    assert series["volume"]["spacing_mm"][2] == 1.0
    assert any("Spacing Between Slices" in n for n in series["notes"])


def test_degenerate_orientation_never_becomes_a_nan_direction(tmp_path):
    folder = tmp_path / "in"
    write_series(folder, n=3, orientation=(0, 0, 0, 0, 0, 0))
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out", "--rules", "permissive")
    assert code == 0, err  # documented: taken as "no orientation" (Unknown, identity, noted)
    series = json.loads((tmp_path / "out" / "series.json").read_text())
    assert np.all(np.isfinite(series["volume"]["direction"])) and series["orientation"] == "Unknown"
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out2")
    assert_refused(code, err, tmp_path / "out2", "Unknown")


def test_header_text_stays_out_of_reasons(tmp_path):
    folder = tmp_path / "in"
    write_series(folder, n=2, description="<script>alert(1)</script> DOE^JOHN MRN 12345678")
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out")
    line = assert_refused(code, err, tmp_path / "out", "series 1")
    text = line + (tmp_path / "out" / "rejections.json").read_text()
    assert "DOE" not in text and "script" not in text and "12345678" not in text


# -- zips and plain files ----------------------------------------------------------------------


def _zip_of_zeros(path: Path, mib: int) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("a.dcm", "w", force_zip64=True) as f:
        chunk = bytes(1 << 20)
        for _ in range(mib):
            f.write(chunk)


def test_zip_bomb_is_refused_by_its_compression_ratio(tmp_path):
    _zip_of_zeros(tmp_path / "bomb.zip", 64)
    assert (tmp_path / "bomb.zip").stat().st_size < 200_000
    code, err, elapsed = run_ingest(tmp_path, tmp_path / "bomb.zip", tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "bomb.zip", "compression ratio", "DIFFUGTS_MAX_ZIP_RATIO")
    assert elapsed < 20


def test_zip_size_limit_message_keeps_its_fraction(tmp_path):
    with zipfile.ZipFile(tmp_path / "big.zip", "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.dcm", os.urandom(40 << 20))
    code, err, _ = run_ingest(tmp_path, tmp_path / "big.zip", tmp_path / "out", env={"DIFFUGTS_MAX_ZIP_GB": "0.03"})
    assert_refused(code, err, tmp_path / "out", "above the 0.03 GiB limit")


def test_a_large_zero_file_in_a_folder_is_rejected_fast(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "zeros.bin", "wb") as f:
        f.truncate(64 << 20)
    code, err, elapsed = run_ingest(tmp_path, folder, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "not a DICOM file")
    assert elapsed < 20, elapsed


def _patch_zip(path: Path, flag: int | None = None, method: int | None = None) -> None:
    """Set a general-purpose flag bit or the compression method in every header."""
    data = bytearray(path.read_bytes())
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.find(sig)
        while at >= 0:
            if flag is not None:
                struct.pack_into("<H", data, at + flag_at, struct.unpack_from("<H", data, at + flag_at)[0] | flag)
            if method is not None:
                struct.pack_into("<H", data, at + method_at, method)
            at = data.find(sig, at + 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["encrypted", "deflate64", "corrupt"])
def test_unreadable_zips_are_one_line(tmp_path, kind):
    paths = write_series(tmp_path / "series", n=3)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in paths:
            zf.write(p, p.name)
    if kind == "encrypted":
        _patch_zip(archive, flag=0x1)
    elif kind == "deflate64":
        _patch_zip(archive, method=9)
    else:
        data = bytearray(archive.read_bytes())
        start = data.find(b"PK\x03\x04") + 30 + len(paths[0].name)
        data[start : start + 64] = os.urandom(64)
        archive.write_bytes(bytes(data))
    code, err, _ = run_ingest(tmp_path, archive, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "study.zip")


# -- where the output goes -------------------------------------------------------------------


def test_output_path_that_is_not_utf8(tmp_path):
    folder = tmp_path / "in"
    write_series(folder, n=3)
    out = os.fsencode(tmp_path) + b"/out-\xff\xfe"
    code, err, _ = run_ingest(tmp_path, folder, out)
    assert_refused(code, err, None, "UTF-8")
    assert not os.path.exists(os.path.join(out, b"series.json"))


@pytest.mark.parametrize("where", ["sysfs", "file"])
def test_output_that_cannot_be_written(tmp_path, where):
    folder = tmp_path / "in"
    write_series(folder, n=3)
    if where == "file":
        out = tmp_path / "taken"
        out.write_text("a file, not a folder")
    else:
        out = Path("/sys/diffugts-test-out")  # sysfs refuses new folders, also to root
    code, err, _ = run_ingest(tmp_path, folder, out)
    assert_refused(code, err, None, "cannot write")


def test_full_disk_is_a_storage_error(tmp_path):
    folder = tmp_path / "in"
    write_series(folder, n=8, rows=64, cols=64)
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out", fsize=16 << 10)
    assert_refused(code, err, tmp_path / "out", "cannot write", "File too large")


def test_a_rule_on_free_text_does_not_echo_it(tmp_path):
    folder = tmp_path / "in"
    write_series(folder, n=3, description="DOE^JOHN MRN 12345678")
    rules = {"selections": [{"name": "T2 only", "conditions": {"SeriesDescription": "(?i)t2"}}]}
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out", "--rules", json.dumps(rules))
    line = assert_refused(code, err, tmp_path / "out", "SeriesDescription", "does not match")
    assert "DOE" not in line + (tmp_path / "out" / "rejections.json").read_text()


def test_a_deflated_data_set_is_bounded_before_it_inflates(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = _one(tmp_path / "in", rows=2, cols=2)
    ds = pydicom.dcmread(path)
    ds.PixelData = bytes(120 << 20)  # 120 MiB of zeros behind a 2x2 image: about 120 KB deflated
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path)
    assert path.stat().st_size < 1 << 20
    # A 32 MiB volume budget + 64 MiB of header slack < 120 MiB.
    code, err, _ = run_ingest(tmp_path, path, tmp_path / "out", env={"DIFFUGTS_MAX_VOLUME_GB": "0.03125"})
    assert_refused(code, err, tmp_path / "out", path.name, "inflates beyond")


def test_a_failed_write_does_not_leave_the_earlier_study_looking_complete(tmp_path):
    folder = tmp_path / "in"
    write_series(folder, n=8, rows=64, cols=64)
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out")
    assert code == 0 and (tmp_path / "out" / "series.json").exists()
    code, err, _ = run_ingest(tmp_path, folder, tmp_path / "out", fsize=16 << 10)
    assert_refused(code, err, tmp_path / "out", "cannot write")
