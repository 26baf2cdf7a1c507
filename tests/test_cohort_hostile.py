"""Cohort runs against hostile headers and faults: a Study Instance UID is never a path, two
inputs of one study are reported as a duplicate, a failed re-publish is not left "done", and
a study folder whose name is not UTF-8 does not sink the run (issue #23)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffugts.errors import DiffugtsError, InputError
from diffugts.runners import cohort

# The helpers of the cohort tests: a model package and a report folder as the stages leave them.
from test_cohort import PARAMS, _model, _report


def _files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def _plan(tmp_path: Path, names=("s1", "s2"), run="r1", **kw):
    studies = tmp_path / "studies"
    for name in names:
        (studies / name).mkdir(parents=True, exist_ok=True)
    results = str(tmp_path / "results")
    listing = cohort.plan_run(
        results, run, studies_uri=str(studies), model_uri=_model(tmp_path / "m"), **{**PARAMS, **kw}
    )
    return results, listing


@pytest.mark.parametrize("uid", ["ABSOLUTE", "../../../x", "1.2/../../x", "1.2.3\n", "", "1." + "2" * 70, "DOE^JOHN"])
def test_a_study_uid_that_is_not_a_uid_never_becomes_a_path(tmp_path, uid):
    results, listing = _plan(tmp_path, names=("s1",))
    item = listing["pending"][0]
    if uid == "ABSOLUTE":  # an absolute path, inside this test's folder
        uid = str(tmp_path / "outside")
    before = _files(tmp_path)
    with pytest.raises(InputError, match="not a valid DICOM UID") as err:
        cohort.mark_done(
            _report(tmp_path / "report", uid),
            results,
            item["key"],
            model_sha256=item["model_sha256"],
            params_hash=item["params_hash"],
            run="r1",
        )
    if uid.strip():
        assert uid.strip() not in str(err.value)  # header text is not echoed
    new = _files(tmp_path) - before
    # Nothing outside results/ (but the input report folder), and no report published anywhere.
    assert all(p.startswith((results, str(tmp_path / "report"))) for p in new), new
    assert not list(Path(results).rglob("report.html"))
    assert not (tmp_path / "outside").exists()
    marker = json.loads(Path(cohort.marker_uri(results, item["key"])).read_text())
    assert marker["status"] == "failed" and marker["stage"] == "publish"

    summary = cohort.collect_run(results, "r1", tmp_path / "out")
    (failure,) = summary["failures"]
    assert failure["stage"] == "publish" and failure["reason_code"] == "bad_input"
    assert "not a valid DICOM UID" in failure["reason"]


def test_two_inputs_of_one_study_are_reported_as_a_duplicate(tmp_path):
    results, listing = _plan(tmp_path)
    first, second = listing["pending"]
    cohort.mark_done(
        _report(tmp_path / "r1", "1.2.3", key="a"),
        results,
        first["key"],
        model_sha256=first["model_sha256"],
        params_hash=first["params_hash"],
        run="r1",
    )
    with pytest.raises(DiffugtsError, match="duplicate"):
        cohort.mark_done(
            _report(tmp_path / "r2", "1.2.3", key="b"),
            results,
            second["key"],
            model_sha256=second["model_sha256"],
            params_hash=second["params_hash"],
            run="r1",
        )
    # The first input's result is untouched.
    published = json.loads((Path(results) / "1.2.3" / "report" / "report.json").read_text())
    assert published["study"]["study_key"] == "a"

    summary = cohort.collect_run(results, "r1", tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (1, 1)
    (failure,) = summary["failures"]
    assert failure["key"] == second["key"] and failure["reason_code"] == "duplicate"
    assert first["key"] in failure["reason"] and "1.2.3" not in failure["reason"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "cohort.csv").read_text())))
    assert sorted(r["status"] for r in rows) == ["done", "failed"]
    # A forced rerun of the first input may re-publish its own result.
    cohort.mark_done(
        _report(tmp_path / "r3", "1.2.3", key="a2"),
        results,
        first["key"],
        model_sha256=first["model_sha256"],
        params_hash=first["params_hash"],
        run="r2",
    )


def test_two_done_markers_on_one_result_count_once(tmp_path):
    """Two inputs of one study finishing at the same moment both pass the owner check; the
    cohort report still shows the study once and the second input as a duplicate."""
    results, listing = _plan(tmp_path)
    first, second = listing["pending"]
    for n, item in enumerate((first, second)):
        cohort.mark_done(
            _report(tmp_path / f"r{n}", "1.2.3"),
            results,
            item["key"],
            model_sha256=item["model_sha256"],
            params_hash=item["params_hash"],
            run="r1",
        )
        if n == 0:  # forget the owner record, as a concurrent writer would not have seen it yet
            for p in (Path(results) / "_runs" / "studies").iterdir():
                p.unlink()
    summary = cohort.collect_run(results, "r1", tmp_path / "out")
    assert (summary["studies"], summary["done"], summary["failed"]) == (2, 1, 1)
    assert summary["failures"][0]["reason_code"] == "duplicate"


def test_a_failed_republish_is_not_left_done(tmp_path, monkeypatch):
    results, listing = _plan(tmp_path, names=("s1",))
    item = listing["pending"][0]
    kw = {"model_sha256": item["model_sha256"], "params_hash": item["params_hash"]}
    cohort.mark_done(_report(tmp_path / "a", "1.2.3"), results, item["key"], run="r1", **kw)
    # A forced rerun fails while re-publishing (storage cut).
    forced = cohort.plan_run(
        results, "r2", studies_uri=str(tmp_path / "studies"), model_uri=str(tmp_path / "m"), force=True, **PARAMS
    )
    assert forced["pending"]

    def cut(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cohort, "publish", cut)
    with pytest.raises(DiffugtsError, match="No space left"):
        cohort.mark_done(_report(tmp_path / "b", "1.2.3"), results, item["key"], run="r2", **kw)
    monkeypatch.undo()
    marker = json.loads(Path(cohort.marker_uri(results, item["key"])).read_text())
    assert marker["status"] == "failed" and marker["reason_code"] == "storage"
    # The next run processes it again instead of skipping it.
    again = cohort.plan_run(
        results, "r3", studies_uri=str(tmp_path / "studies"), model_uri=str(tmp_path / "m"), **PARAMS
    )
    assert [i["key"] for i in again["pending"]] == [item["key"]] and not again["skipped"]
    summary = cohort.collect_run(results, "r2", tmp_path / "out")
    assert summary["failures"][0]["stage"] == "publish" and summary["failures"][0]["reason_code"] == "storage"


def test_a_study_folder_name_that_is_not_utf8_does_not_sink_the_cohort(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    bad = os.fsdecode(b"DOE\xff\xfeJOHN")
    (studies / bad).mkdir()
    (studies / "good").mkdir()
    results = str(tmp_path / "results")
    listing = cohort.plan_run(results, "r1", studies_uri=str(studies), model_uri=_model(tmp_path / "m"), **PARAMS)
    assert len(listing["pending"]) == 2
    raw = (Path(results) / "_runs" / "cohort-r1" / "listing.json").read_bytes()
    raw.decode("utf-8")  # valid UTF-8 JSON
    item = next(i for i in listing["pending"] if not i["input_uri"].endswith("good"))
    assert Path(item["input_uri"]).exists()
    summary = cohort.collect_run(results, "r1", tmp_path / "out")
    assert summary["failed"] == 2  # both empty, each with its own reason; the run itself completes
    assert all(f["stage"] == "ingest" for f in summary["failures"])


def test_everything_that_reaches_kfp_markdown_is_escaped():
    from diffugts.stages.ingest.summary import selection_markdown

    evil = "<script>alert(1)</script> | [x](javascript:alert(1)) *DOE*"
    text = cohort.run_markdown(
        {
            "run": "r1",
            "listed": 1,
            "skipped": 0,
            "processed": 1,
            "done": 0,
            "failed": 1,
            "lesions": 0,
            "report": "/r/cohort/r1",
            "failures": [{"key": "k", "stage": "ingest", "reason_code": "bad_input", "reason": evil}],
        }
    )
    series = {
        "series_label": evil,
        "orientation": "Axial",
        "notes": [evil],
        "volume": {"size_ijk": [1, 1, 1], "spacing_mm": [1, 1, 1], "units": "HU"},
        "selection": {
            "candidates": [
                {"label": evil, "taken": False, "reasons": [evil]},
                {"label": "s2", "taken": True, "selection": evil, "reasons": []},
            ]
        },
    }
    for doc in (text, selection_markdown(series)):
        assert "<script>" not in doc and "[x](" not in doc and "*DOE*" not in doc
        assert "&lt;script&gt;" in doc
        for row in (line for line in doc.splitlines() if line.startswith("| ")):
            assert row.count(" | ") - row.count("\\|") <= 3  # no cell split by a value


def test_a_corrupt_marker_does_not_sink_the_listing(tmp_path):
    results, listing = _plan(tmp_path)
    first = listing["pending"][0]
    Path(cohort.marker_uri(results, first["key"])).write_bytes(b"\xff{ not json")
    again = cohort.plan_run(
        results, "r2", studies_uri=str(tmp_path / "studies"), model_uri=str(tmp_path / "m"), **PARAMS
    )
    assert len(again["pending"]) == 2  # the study with the unreadable marker runs again
    summary = cohort.collect_run(results, "r2", tmp_path / "out")
    assert summary["failed"] == 2 and summary["listed"] == 2


@pytest.mark.parametrize("uid", ["../x", "/abs", "1.2.3/../../4", "1.2.3\n"])
def test_the_report_stage_upload_refuses_a_uid_that_is_not_a_uid(uid):
    from diffugts.stages.report.upload import results_prefix

    with pytest.raises(InputError, match="not a valid DICOM UID"):
        results_prefix(uid, "s3://bucket/results")
    assert results_prefix("1.2.840.1", "s3://bucket/results") == "s3://bucket/results/1.2.840.1/report"


def _stub_batch_stages(monkeypatch, uids: dict[str, str]) -> None:
    """run_batch with its ingestion, model and report stages stubbed: each input's report names
    the Study Instance UID given for its folder."""
    import diffugts.core
    import diffugts.runners.segment
    import diffugts.stages.ingest
    import diffugts.stages.report

    class Core:
        def __init__(self, model_uri, device=None, params=None):
            self.package = SimpleNamespace(sha256=cohort.model_sha256(model_uri))

        def load(self):
            return self

    class StudyRun:
        def __init__(self, core, study_dir, prompts, folders):
            self.folders = folders

        def run(self, stage):
            pass

        def report(self, upload=None):
            f = self.folders
            return diffugts.stages.report.make_report(f["study"], f["lesions"], f["report"])

    def ingest(uri, out, **kwargs):
        Path(out).mkdir(parents=True)
        (Path(out) / "uid").write_text(uids[Path(uri).name])

    def make_report(study, lesions, out, **kwargs):
        _report(Path(out), (Path(study) / "uid").read_text(), key=Path(study).parent.name)

    monkeypatch.setattr(diffugts.stages.ingest, "ingest", ingest)
    monkeypatch.setattr(diffugts.stages.report, "make_report", make_report)
    monkeypatch.setattr(diffugts.core, "Core", Core)
    monkeypatch.setattr(diffugts.runners.segment, "StudyRun", StudyRun)


def test_a_batch_publishes_by_the_same_rules(tmp_path, monkeypatch):
    """The cohort pipeline publishes in its batch tasks (diffugts.runners.batch): a UID that is not a
    UID and a second input of one study fail there as in mark_done, the batch goes on, and a
    forced run's failed re-publish leaves the study failed, not done."""
    from diffugts.runners.batch import run_batch

    results, listing = _plan(tmp_path, names=("s1", "s2", "s3"))
    names = {i["key"]: Path(i["input_uri"]).name for i in listing["pending"]}
    _stub_batch_stages(monkeypatch, {"s1": "1.2.3", "s2": "1.2.3", "s3": "../x"})
    model = str(tmp_path / "m")
    assert run_batch(results, "r1", 0, model_uri=model, prompts=PARAMS["prompts"]) == {
        "done": 1,
        "failed": 2,
        "already_done": 0,
    }
    summary = cohort.collect_run(results, "r1", tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (1, 2)
    failures = {names[f["key"]]: f for f in summary["failures"]}
    assert (failures["s2"]["stage"], failures["s2"]["reason_code"]) == ("publish", "duplicate")
    assert (failures["s3"]["stage"], failures["s3"]["reason_code"]) == ("publish", "bad_input")
    assert "../x" not in failures["s3"]["reason"]
    assert not (Path(results).parent / "x").exists()

    # A forced run processes s1 again (not skipped as done by the earlier run); its result
    # cannot be written: the study is failed (publish, storage), not left done.
    cohort.plan_run(results, "r2", studies_uri=str(tmp_path / "studies"), model_uri=model, force=True, **PARAMS)
    publish = cohort.publish

    def cut(src, dst, **kwargs):
        if dst.rstrip("/").endswith("/report"):
            raise OSError(28, "No space left on device")
        return publish(src, dst, **kwargs)

    monkeypatch.setattr(cohort, "publish", cut)
    assert run_batch(results, "r2", 0, model_uri=model, prompts=PARAMS["prompts"]) == {
        "done": 0,
        "failed": 3,
        "already_done": 0,
    }
    s1 = next(k for k, n in names.items() if n == "s1")
    marker = cohort.read_marker(results, s1)
    assert (marker["status"], marker["stage"], marker["reason_code"]) == ("failed", "publish", "storage")
