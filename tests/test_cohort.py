"""Cohort runs: listing (local, S3, CSV), idempotency markers, failure records, the cohort
report and the run record (diffugts.runners.cohort), the submitter (pipelines.submit, fake client), and
the cohort pipeline end to end under kfp.local with a broken study among good ones."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffugts.errors import ConfigError, InputError, ParameterError
from diffugts.runners import cohort
from diffugts.storage.location import join, read_bytes
from pipelines import submit

PARAMS = {"prompts": ["liver tumor"], "rules": "default", "resample": False, "min_volume_ml": 0.1}


def _model(root: Path, text: str = '{"format": "diffugts-model/1"}') -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(text)
    return str(root)


def _report(folder: Path, uid: str, key: str = "k") -> Path:
    """A report folder as the report stage leaves it (report.json is what the cohort reads)."""
    folder.mkdir(parents=True)
    (folder / "report.html").write_text("<html></html>")
    (folder / "report.json").write_text(
        json.dumps(
            {
                "status": "done",
                "study": {"study_key": key, "study_instance_uid": uid, "modality": "CT"},
                "targets": [{"index": 0, "text": "liver tumor", "score": 0.5, "lesion_ids": []}],
                "lesions": [],
            }
        )
    )
    return folder


# ---------------------------------------------------------------------------- keys, listing


def test_study_key_is_stable_and_names_nothing():
    key = cohort.study_key("s3://b/studies/DOE^JOHN/")
    assert key == cohort.study_key("s3://b/studies/DOE^JOHN") and len(key) == 32
    assert "DOE" not in key and key != cohort.study_key("s3://b/studies/ROE^JANE")


def test_params_hash_follows_every_parameter():
    base = cohort.params_hash(**PARAMS)
    assert base == cohort.params_hash(**{**PARAMS, "min_volume_ml": 0.1})
    for change in (
        {"prompts": ["liver tumor", "kidney tumor"]},
        {"rules": "permissive"},
        {"resample": True},
        {"min_volume_ml": 0.5},
    ):
        assert cohort.params_hash(**{**PARAMS, **change}) != base, change
    two = {**PARAMS, "prompts": ["a", "b"]}
    assert cohort.params_hash(**two) != cohort.params_hash(**{**two, "prompts": ["b", "a"]})
    # The map source: the default adds nothing to the hash, so studies marked before the
    # option existed were not re-run for it. (The value changed once since, when the
    # synthesis defaults entered the hash, after the step default went from 20 to 10.)
    assert base == "6b61c7edaf6345da60e764ceaade67a65003374673d7de522199698a7ba7d438"
    assert cohort.params_hash(**PARAMS, maps="aova") == base != cohort.params_hash(**PARAMS, maps="training-free")
    # Likewise the lesion verifier's operating point: the model's own adds nothing.
    assert cohort.params_hash(**PARAMS, verifier_threshold=None) == base
    points = [cohort.params_hash(**PARAMS, verifier_threshold=t) for t in (0.5, 0.6)]
    assert len({base, *points}) == 3


def test_params_hash_follows_the_methods_defaults(monkeypatch):
    """A release that changes a synthesis default must not count studies done with the old
    one as done (the cohort pipeline runs synthesis with the defaults)."""
    import dataclasses

    from diffugts.config import SynthesisParams

    base = cohort.params_hash(**PARAMS)

    @dataclasses.dataclass(frozen=True)
    class Twenty(SynthesisParams):
        steps: int = 20

    monkeypatch.setattr(cohort, "SynthesisParams", Twenty)
    assert cohort.params_hash(**PARAMS) != base


def test_list_local_folder(tmp_path):
    for name in ("b", "a", "_runs", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "c.zip").write_bytes(b"PK")
    (tmp_path / "notes.txt").write_text("not a study")
    assert cohort.list_inputs(str(tmp_path)) == [str(tmp_path / n) for n in ("a", "b", "c.zip")]
    with pytest.raises(InputError, match="no such folder"):
        cohort.list_inputs(str(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        cohort.list_inputs("", "")


def test_list_from_csv(tmp_path):
    (tmp_path / "lists").mkdir()
    csv_path = tmp_path / "lists" / "cohort.csv"
    csv_path.write_text("input_uri,site\nrel/study1,A\n/abs/study2,B\n,C\nrel/study1,A\ns3://b/x/,D\n")
    assert cohort.list_inputs("ignored", str(csv_path)) == [
        str(tmp_path / "lists" / "rel" / "study1"),
        "/abs/study2",
        "s3://b/x/",
    ]
    csv_path.write_text("path\n/a\n")
    with pytest.raises(InputError, match="no input_uri column"):
        cohort.list_inputs("", str(csv_path))


def test_list_s3_prefix_and_csv(s3_env):
    from diffugts.storage import ObjectStore

    store, base = ObjectStore(), f"s3://{s3_env.bucket}/list-test"
    for key in (
        "studies/a/1.dcm",
        "studies/a/sub/2.dcm",
        "studies/b/1.dcm",
        "studies/c.zip",
        "studies/_runs/x.json",
        "studies/readme.txt",
        "studies-other/d/1.dcm",
    ):
        store.put_bytes(f"{base}/{key}", b"x")
    assert cohort.list_inputs(f"{base}/studies/") == [f"{base}/studies/a", f"{base}/studies/b", f"{base}/studies/c.zip"]
    assert cohort.list_inputs(f"{base}/studies") == cohort.list_inputs(f"{base}/studies/")
    store.put_bytes(f"{base}/cohort.csv", b"input_uri\ns3://b/one\ns3://b/two\n")
    assert cohort.list_inputs("", f"{base}/cohort.csv") == ["s3://b/one", "s3://b/two"]
    with pytest.raises(InputError, match="no such file"):
        cohort.list_inputs("", f"{base}/missing.csv")


# ---------------------------------------------------------------------------- idempotency


def _plan(results: str, studies: Path, model: str, run: str = "r1", **kw):
    listing = cohort.plan_run(results, run, studies_uri=str(studies), model_uri=model, **{**PARAMS, **kw})
    return [i["input_uri"] for i in listing["pending"]], [i["input_uri"] for i in listing["skipped"]]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_run_skips_done_studies_until_model_or_parameters_change(tmp_path, where, request):
    studies = tmp_path / "studies"
    for name in ("s1", "s2"):
        (studies / name).mkdir(parents=True)
    if where == "s3":
        env = request.getfixturevalue("s3_env")
        results = f"s3://{env.bucket}/idem-{tmp_path.name}/results"
    else:
        results = str(tmp_path / "results")
    model = _model(tmp_path / "model")
    s1, s2 = str(studies / "s1"), str(studies / "s2")

    listing = cohort.plan_run(results, "r1", studies_uri=str(studies), model_uri=model, **PARAMS)
    assert [i["input_uri"] for i in listing["pending"]] == [s1, s2] and not listing["skipped"]
    assert json.loads(read_bytes(join(cohort.run_uri(results, "r1"), "listing.json")))["run"] == "r1"
    item = listing["pending"][0]
    marker = cohort.mark_done(
        _report(tmp_path / "report", "1.2.3"),
        results,
        item["key"],
        model_sha256=item["model_sha256"],
        params_hash=item["params_hash"],
        run="r1",
    )
    # The result sits where the report stage's upload puts it, and the marker points at it.
    assert marker["result"] == cohort.join(results, "1.2.3", "report")
    assert json.loads(read_bytes(join(marker["result"], "report.json")))["study"]["study_key"] == "k"
    if where == "s3":
        assert read_bytes(join(marker["result"], "_manifest.json"))  # published manifest-last

    assert _plan(results, studies, model) == ([s2], [s1])
    assert _plan(results, studies, model, force=True) == ([s1, s2], [])
    assert _plan(results, studies, model, min_volume_ml=0.5) == ([s1, s2], [])
    assert _plan(results, studies, model, prompts=["kidney tumor"]) == ([s1, s2], [])
    _model(tmp_path / "model", '{"format": "diffugts-model/1", "name": "retrained"}')
    assert _plan(results, studies, model) == ([s1, s2], [])


def test_an_operating_point_is_checked_when_the_studies_are_listed_not_in_every_batch(tmp_path):
    (tmp_path / "studies" / "s1").mkdir(parents=True)
    plain = _model(tmp_path / "model")
    verified = _model(
        tmp_path / "verified",
        '{"format": "diffugts-model/1", "networks": {"refine": {"verifier": {"threshold": 0.2}}}}',
    )

    def plan(model, threshold):
        studies = str(tmp_path / "studies")
        return cohort.plan_run(
            str(tmp_path / "results"), "r", studies_uri=studies, model_uri=model, verifier_threshold=threshold, **PARAMS
        )

    with pytest.raises(ParameterError, match="verifier_threshold"):
        plan(verified, 1.5)
    with pytest.raises(ConfigError, match="has no lesion verifier"):  # nothing to set: said once
        plan(plain, 0.5)
    assert not (tmp_path / "results").exists()
    assert len(plan(verified, 0.5)["pending"]) == 1 and len(plan(plain, None)["pending"]) == 1


def test_model_must_be_a_package(tmp_path):
    with pytest.raises(InputError, match="not a model package"):
        cohort.model_sha256(str(tmp_path))


# ---------------------------------------------------------------------------- failures, report, record


def test_failed_studies_are_reported_with_their_reason(tmp_path, pushgateway_url):
    from diffugts.stages.report.cohort import FAILED_MARKER

    studies, results, run = tmp_path / "studies", str(tmp_path / "results"), "r7"
    (studies / "good").mkdir(parents=True)
    (studies / "broken").mkdir()
    (studies / "broken" / "a.dcm").write_bytes(b"not dicom")
    (studies / "broken" / "b.dcm").write_bytes(b"not dicom either")
    listing = cohort.plan_run(results, run, studies_uri=str(studies), model_uri=_model(tmp_path / "m"), **PARAMS)
    good = next(i for i in listing["pending"] if i["input_uri"].endswith("good"))
    cohort.mark_done(
        _report(tmp_path / "report", "1.2.3"),
        results,
        good["key"],
        model_sha256=good["model_sha256"],
        params_hash=good["params_hash"],
        run=run,
    )

    summary = cohort.collect_run(results, run, tmp_path / "out")
    assert (summary["listed"], summary["processed"], summary["done"], summary["failed"]) == (2, 2, 1, 1)
    (failure,) = summary["failures"]
    assert failure["stage"] == "ingest" and failure["reason_code"] == "no_series"
    assert "no DICOM files" in failure["reason"] and str(studies) not in failure["reason"]
    rows = {r["status"]: r for r in csv.DictReader(io.StringIO((tmp_path / "out" / "cohort.csv").read_text()))}
    assert rows["failed"]["reason"] == failure["reason"]
    record = json.loads(Path(rows["failed"]["source"], FAILED_MARKER).read_text())
    assert record["input_uri"].endswith("broken") and record["run"] == run
    marker = json.loads(Path(cohort.marker_uri(results, failure["key"])).read_text())
    assert marker["status"] == "failed" and marker["reason"] == failure["reason"]
    assert (Path(results) / "cohort" / run / "cohort.html").exists()
    assert "| ingest | no_series |" in cohort.run_markdown(summary)
    # A failed study is not done: the next run tries it again.
    assert [
        i["key"]
        for i in cohort.plan_run(results, "r8", studies_uri=str(studies), model_uri=str(tmp_path / "m"), **PARAMS)[
            "pending"
        ]
    ] == [failure["key"]]

    record = cohort.finish_run(results, run, "FAILED", "Task exit-handler-1 failed.", gateway=pushgateway_url)
    assert record == json.loads((Path(results) / "_runs" / f"cohort-{run}.json").read_text())
    assert (record["done"], record["failed"], record["skipped"], record["state"]) == (1, 1, 0, "FAILED")
    pushed = _gauges(pushgateway_url)
    assert pushed[("diffugts_cohort_studies", "failed")] == 1 and pushed[("diffugts_cohort_studies", "done")] == 1
    assert pushed[("diffugts_cohort_last_run_succeeded", None)] == 0


def _gauges(gateway: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{gateway}/metrics", timeout=10).read().decode()
    return {
        (s.name, s.labels.get("outcome")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("diffugts_cohort") and s.labels.get("stage") == "cohort"
    }


# The states an exit handler receives: kfp.local / Vertex "SUCCEEDED"; the KFP backend the
# ML Metadata state ("COMPLETE", "CACHED"), newer KFP "COMPLETE" for SUCCEEDED/SKIPPED/CACHED.
@pytest.mark.parametrize(
    "state, succeeded",
    [
        ("SUCCEEDED", True),
        ("COMPLETE", True),
        ("CACHED", True),
        ("SKIPPED", True),
        ("FAILED", False),
        ("CANCELED", False),
        ("CANCELLED", False),
        ("RUNNING", False),
        ("", False),
    ],
)
def test_run_record_knows_the_states_the_backends_send(tmp_path, monkeypatch, state, succeeded):
    from diffugts.utils import prometheus as metrics

    pushed = []
    monkeypatch.setattr(metrics, "push", lambda registry, job, gateway: pushed.append(registry) or True)
    studies, results, run = tmp_path / "studies", str(tmp_path / "results"), "r1"
    (studies / "good").mkdir(parents=True)
    listing = cohort.plan_run(results, run, studies_uri=str(studies), model_uri=_model(tmp_path / "m"), **PARAMS)
    (item,) = listing["pending"]
    cohort.mark_done(
        _report(tmp_path / "report", "1.2.3"),
        results,
        item["key"],
        model_sha256=item["model_sha256"],
        params_hash=item["params_hash"],
        run=run,
    )
    cohort.collect_run(results, run, tmp_path / "out")
    record = cohort.finish_run(results, run, state, gateway="")
    assert (record["state"], record["succeeded"]) == (state, succeeded)
    gauge = pushed[0].get_sample_value("diffugts_cohort_last_run_succeeded")
    assert gauge == (1.0 if succeeded else 0.0)


def test_run_record_without_listing(tmp_path):
    record = cohort.finish_run(str(tmp_path), "r0", "FAILED", "listing failed", gateway="")
    assert record["listed"] is None and record["report"] is None
    with pytest.raises(InputError, match="no listing.json"):
        cohort.collect_run(str(tmp_path), "r0", tmp_path / "out")


def test_a_study_that_ingests_is_blamed_on_a_later_stage(tmp_path):
    from diffugts.phantom import CaseSpec, generate_case, write_case

    case = write_case(generate_case(CaseSpec(seed=3, index=0, shape=(16, 32, 32))), tmp_path)
    stage, exc = cohort.diagnose(str(case / "dicom"))
    assert stage == "pipeline" and isinstance(exc, cohort.LaterStageFailure)
    stage, exc = cohort.diagnose(str(tmp_path / "nothing-here"))
    assert stage == "ingest" and "no such file or folder" in str(exc)


# ---------------------------------------------------------------------------- submitter


class FakeClient:
    """The kfp.Client calls pipelines.submit makes, recorded; no network."""

    def __init__(self, multi_user=True, pipelines=("diffugts-cohort",)):
        self.calls, self.multi_user, self.pipelines = [], multi_user, pipelines
        self.spec = {
            "pipeline_spec": {
                "root": {
                    "inputDefinitions": {
                        "parameters": {
                            "studies_uri": {"parameterType": "STRING"},
                            "prompts": {"parameterType": "LIST"},
                            "resample": {"parameterType": "BOOLEAN"},
                            "min_volume_ml": {"parameterType": "NUMBER_DOUBLE"},
                        }
                    }
                }
            }
        }

    def get_kfp_healthz(self):
        return SimpleNamespace(multi_user=self.multi_user)

    def list_pipelines(self, filter, page_size, namespace):
        self.calls.append(("list_pipelines", namespace))
        name = json.loads(filter)["predicates"][0]["stringValue"]
        hit = name in self.pipelines and namespace == (None if not self.multi_user else "diffugts")
        return SimpleNamespace(pipelines=[SimpleNamespace(pipeline_id="p1")] if hit else None)

    def list_pipeline_versions(self, pipeline_id, page_size, sort_by):
        self.calls.append(("list_pipeline_versions", pipeline_id, sort_by))
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(pipeline_version_id="v2")])

    def get_pipeline_version(self, pipeline_id, version_id):
        return SimpleNamespace(
            pipeline_version_id=version_id, display_name="diffugts-cohort-0-1-0", pipeline_spec=self.spec
        )

    def create_experiment(self, name, namespace=None):
        self.calls.append(("create_experiment", name, namespace))
        return SimpleNamespace(experiment_id="e1")

    def run_pipeline(self, experiment_id, job_name, **kw):
        self.calls.append(("run_pipeline", experiment_id, job_name, kw))
        return SimpleNamespace(run_id="run-1")


ARGV = [
    "--pipeline",
    "diffugts-cohort",
    "--experiment",
    "nightly",
    "--namespace",
    "diffugts",
    "--service-account",
    "diffugts-pipeline",
    "--run-name",
    "n1",
]


def test_submit_parses_repeated_params():
    args = submit.parse_args(ARGV + ["--param", "studies_uri=s3://b/x=y/", "--param", "resample=true"])
    assert args.params == {"studies_uri": "s3://b/x=y/", "resample": "true"}
    for bad in (["--param", "novalue"], ["--param", "=x"], ["--param", "a=1", "--param", "a=2"], ["--pipeline"]):
        with pytest.raises(SystemExit) as exit_info:
            submit.parse_args(ARGV + bad)
        assert exit_info.value.code == 2


def test_submit_runs_the_newest_version_with_typed_params(capsys):
    client = FakeClient()
    argv = ARGV + [
        "--param",
        "studies_uri=s3://b/in/",
        "--param",
        'prompts=["liver tumor"]',
        "--param",
        "resample=False",
        "--param",
        "min_volume_ml=0.5",
    ]
    assert submit.main(argv, client=client) == 0
    assert "submitted run run-1" in capsys.readouterr().out
    assert ("list_pipeline_versions", "p1", "created_at desc") in client.calls
    assert ("create_experiment", "nightly", "diffugts") in client.calls
    ((_, experiment, name, kw),) = [c for c in client.calls if c[0] == "run_pipeline"]
    assert (experiment, name, kw["pipeline_id"], kw["version_id"], kw["service_account"]) == (
        "e1",
        "n1",
        "p1",
        "v2",
        "diffugts-pipeline",
    )
    assert kw["params"] == {
        "studies_uri": "s3://b/in/",
        "prompts": ["liver tumor"],
        "resample": False,
        "min_volume_ml": 0.5,
    }


def test_submit_single_user_kfp_sends_no_namespace():
    client = FakeClient(multi_user=False)
    assert submit.main(ARGV, client=client) == 0
    assert ("create_experiment", "nightly", None) in client.calls
    assert all(c[1] is None for c in client.calls if c[0] == "list_pipelines")


@pytest.mark.parametrize(
    "argv, client, message",
    [
        (ARGV, FakeClient(pipelines=()), "no pipeline named 'diffugts-cohort'"),
        (ARGV + ["--param", "studies=s3://x"], FakeClient(), "the pipeline has no parameter 'studies'"),
        (ARGV + ["--param", "resample=maybe"], FakeClient(), "'maybe' is not a valid BOOLEAN"),
    ],
)
def test_submit_fails_with_one_line(argv, client, message, capsys):
    assert submit.main(argv, client=client) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not any(c[0] == "run_pipeline" for c in client.calls)


def test_submit_shortens_api_errors(capsys):
    class ApiError(Exception):
        status, reason = 403, "Forbidden"

    def refuse(*args, **kwargs):
        raise ApiError("(403)\nReason: Forbidden\nHTTP response body: {...}")

    client = FakeClient()
    client.create_experiment = refuse
    assert submit.main(ARGV, client=client) == 1
    assert capsys.readouterr().err == "submit: error: KFP API: 403 Forbidden\n"


def test_submitter_client_works_with_a_read_only_home(tmp_path):
    """In-cluster, multi-user KFP: kfp.Client() saves ~/.config/kfp/context.json; the image's
    home is on a read-only root filesystem. A home below a regular file cannot be written by
    any user (root ignores permission bits), like one on a read-only filesystem."""
    import http.server
    import subprocess
    import sys
    import threading

    class Healthz(http.server.BaseHTTPRequestHandler):  # the KFP API's healthz, on loopback
        def do_GET(self):
            body = json.dumps({"multi_user": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "rootfs").write_text("a file, not a folder")
    code = (
        "from pipelines.submit import make_client\n"
        "client = make_client()\n"
        "client.set_user_namespace('diffugts')  # what kfp.Client does in a pod of multi-user KFP\n"
        "import os; print(os.environ['HOME'])\n"
    )
    env = {
        **os.environ,
        "HOME": str(tmp_path / "rootfs" / "home"),
        "KF_PIPELINES_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        "KF_PIPELINES_SA_TOKEN_PATH": "",
    }
    try:
        out = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", code],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            timeout=120,
        )
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr[-2000:]
    home = Path(out.stdout.strip().splitlines()[-1])
    assert json.loads((home / ".config" / "kfp" / "context.json").read_text())["namespace"] == "diffugts"


# ---------------------------------------------------------------------------- batches


def test_batches_are_bounded_and_dealt_into_lanes():
    from diffugts.runners.batch import MAX_BATCHES, MAX_PARALLEL, plan_batches

    keys = [f"k{i:05d}" for i in range(10_000)]
    plan = plan_batches(keys, batch_size=8, max_parallel=4)
    assert len(plan["batches"]) == MAX_BATCHES == 24 and plan["batch_size"] == 417
    assert [k for b in plan["batches"] for k in b] == keys  # every study once, in order
    assert len(plan["lanes"]) == 4 and sorted(b for lane in plan["lanes"] for b in lane) == list(range(24))
    small = plan_batches(keys[:20], batch_size=8, max_parallel=4)
    assert [len(b) for b in small["batches"]] == [8, 8, 4] and small["lanes"] == [[0], [1], [2]]
    assert plan_batches([], 8, 4) == {"batch_size": 8, "batches": [], "lanes": []}
    with pytest.raises(ConfigError):
        plan_batches(keys, batch_size=0)
    with pytest.raises(ConfigError, match="at most 16"):
        plan_batches(keys, max_parallel=MAX_PARALLEL + 1)


@pytest.mark.slow
def test_a_failed_study_never_sinks_its_batch(tmp_path):
    from diffugts.phantom import CaseSpec, generate_case, write_case
    from diffugts.runners.batch import run_batch
    from modelfactory import random_package

    studies, results, run = tmp_path / "studies", str(tmp_path / "results"), "r1"
    (studies / "b-broken").mkdir(parents=True)
    (studies / "b-broken" / "a.dcm").write_bytes(b"not dicom")
    # Two different studies: copies of one would share a Study Instance UID (a duplicate).
    for index, name in enumerate(("a-good", "c-good")):
        case = write_case(generate_case(CaseSpec(seed=3, index=index, shape=(16, 32, 32))), tmp_path / "cases" / name)
        shutil.copytree(case / "dicom", studies / name)
    model = str(random_package(tmp_path / "model").root)
    listing = cohort.plan_run(results, run, studies_uri=str(studies), model_uri=model, **PARAMS, batch_size=3)
    assert listing["batches"] == [[i["key"] for i in listing["pending"]]] and listing["lanes"] == [[0]]

    counts = run_batch(results, run, 0, model_uri=model, prompts=PARAMS["prompts"])
    assert counts == {"done": 2, "failed": 1, "already_done": 0}
    markers = {Path(i["input_uri"]).name: cohort.read_marker(results, i["key"]) for i in listing["pending"]}
    assert markers["a-good"]["status"] == markers["c-good"]["status"] == "done"
    broken = markers["b-broken"]
    assert (broken["status"], broken["stage"], broken["run"]) == ("failed", "ingest", run)
    # A retried batch redoes nothing that is done.
    assert run_batch(results, run, 0, model_uri=model, prompts=PARAMS["prompts"]) == {
        "done": 0,
        "failed": 1,
        "already_done": 2,
    }
    # The cohort report takes the batch's own record of the failure.
    summary = cohort.collect_run(results, run, tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (2, 1)
    (failure,) = summary["failures"]
    assert failure["stage"] == "ingest" and failure["reason_code"] == broken["reason_code"]
    with pytest.raises(InputError, match="no batch 5"):
        run_batch(results, run, 5, model_uri=model, prompts=PARAMS["prompts"])
