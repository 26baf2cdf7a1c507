"""Component logs carry no input folder names, header text or UIDs (issue #23): the
components run the library inside diffugts.utils.logs.component_step, as the CLI does."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from components.ingest import ingest
from diffugts.utils import logs


def test_the_ingest_component_masks_the_input_and_exits_2(tmp_path, capsys):
    study = tmp_path / "DOE^JOHN_MRN12345678"
    study.mkdir()
    (study / "a.dcm").write_bytes(b"not dicom")
    out = SimpleNamespace(path=str(tmp_path / "study"), metadata={})
    with pytest.raises(SystemExit) as exit_:
        ingest.python_func(
            input_uri=str(study), study_sha256="0" * 64, study=out, summary=SimpleNamespace(path=str(tmp_path / "s.md"))
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("diffugts: error: <input>") and "DOE" not in err and "Traceback" not in err


def test_library_records_that_quote_headers_are_dropped(caplog, monkeypatch):
    monkeypatch.delenv("DIFFUGTS_DEBUG", raising=False)
    logs.install()
    with caplog.at_level(logging.INFO):
        logging.getLogger("pydicom").error("Invalid value for PatientName 'DOE^JOHN'")
        logging.getLogger("highdicom.seg").info("SOP Instance UID 1.2.826.0.1.3680043.8.498.1")
        logging.getLogger("diffugts.stages.ingest").warning("skipped a.dcm: not a DICOM file")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "DOE" not in text and "1.2.826" not in text and "skipped a.dcm" in text


def test_masked_replaces_longest_first():
    assert (
        logs.masked("s3://b/studies/x/: no files; s3://b/studies/x", ("s3://b/studies/x/",))
        == "<input>/: no files; <input>"
    )
