"""`diffugts segment` into a folder that holds an earlier run: every downstream artifact is
invalidated before the run starts, so a failed run never leaves an old report looking
complete, killed staging folders are cleaned up, and an output folder that overlaps the
input is refused (issue #23)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffugts.cli import main
from modelfactory import random_package

MARKERS = (
    "study/series.json",
    "attention/attention.json",
    "synthesis/synthesis.json",
    "lesions/lesions.json",
    "report/report.json",
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_package(tmp_path_factory.mktemp("model"))


def _earlier_run(out: Path) -> None:
    """What a finished run of study A leaves, plus staging folders of a killed run."""
    for marker in MARKERS:
        (out / marker).parent.mkdir(parents=True, exist_ok=True)
        (out / marker).write_text(json.dumps({"status": "done", "study": "A"}))
    (out / "report" / "report.html").write_text("<html>A</html>")
    (out / ".study.x1y2.partial" / "headers").mkdir(parents=True)
    (out / ".report.k9.partial").mkdir()


@pytest.mark.parametrize("broken", ["empty", "garbage"])
def test_a_failed_run_leaves_nothing_of_the_earlier_one(model, tmp_path, capsys, broken):
    out = tmp_path / "o"
    _earlier_run(out)
    src = tmp_path / "in"
    src.mkdir()
    if broken == "garbage":
        (src / "x.dcm").write_bytes(b"\0" * 200)
    code = main(["-q", "segment", str(src), "--out", str(out), "--model", str(model.root), "--prompt", "liver tumor"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    # Only what the failed ingestion records about itself.
    assert left == ["study/rejections.json"], left
    assert not list(out.glob(".*.partial"))


def test_an_output_folder_that_overlaps_the_input_is_refused(model, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "study").mkdir(parents=True)
    (data / "study" / "precious.dcm").write_bytes(b"DICM")
    for args in ([str(data / "study"), "--out", str(data)], [str(data), "--out", str(data / "study" / "o")]):
        code = main(["-q", "segment", *args, "--model", str(model.root), "--prompt", "liver tumor"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "overlap" in err[0]
        assert (data / "study" / "precious.dcm").read_bytes() == b"DICM"
