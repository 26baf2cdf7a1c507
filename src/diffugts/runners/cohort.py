"""Cohort runs: list studies, skip those already done, record outcomes, collect the results.

The steps of the ``diffugts-cohort`` pipeline call these functions; nothing here imports kfp.
Everything lives under ``results_uri``, a local folder or an ``s3://`` prefix:

    <StudyInstanceUID>/report/                   a study's report (the report stage's upload layout)
    _runs/<key>.json                             marker of one study input (see below)
    _runs/studies/<uid-hash>.json                which input published a Study Instance UID's result
    _runs/cohort-<run>/listing.json              what run <run> found: pending and skipped inputs
    _runs/cohort-<run>/failed/<key>/failed.json  why a study of that run failed
    _runs/cohort-<run>.json                      the run's record, written by the exit handler
    cohort/<run>/                                the cohort report (cohort.csv, lesions.csv, cohort.html)

``key`` = the first 32 hex digits of sha256(input URI): object names never carry the input's
folder names (those can hold patient names). The result folder is named by the Study
Instance UID only once it is checked to be a valid UID (header text is never a path), and a
second input of the same study is refused as a duplicate. A marker records the model's sha256
(of its ``manifest.json``), the hash of the study parameters and the status; an input whose
marker says ``done`` with the same model and parameters is skipped by the next run.
Re-publishing withdraws the ``done`` marker first, so a publish that fails half-way leaves the
study ``failed`` (stage ``publish``), never ``done`` with a broken result.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

from diffugts import __version__
from diffugts.artifacts import report as report_artifact
from diffugts.config import DEFAULT_MIN_VOLUME_ML, NO_VERIFIER, REFINE_HEAD, MapMode, RefineParams, SynthesisParams
from diffugts.errors import ConfigError, DiffugtsError, InputError
from diffugts.storage.location import is_s3, join, list_children, publish, read_bytes, read_json, write_json
from diffugts.utils import atomic
from diffugts.utils.markdown import md
from diffugts.utils.uids import checked_uid

RUNS = "_runs"
OWNERS = "studies"  # _runs/studies/: the input that owns each published Study Instance UID
COHORT = "cohort"
MODEL_MANIFEST = "manifest.json"  # diffugts.models.package.MANIFEST; its sha256 names the model
# Diagnosing a failure re-reads the study (see diagnose); past this many, a run stops trying.
MAX_DIAGNOSED = 25
# The exit handler's PipelineTaskFinalStatus.state of a run that went through. kfp.local and
# Vertex send SUCCEEDED. The KFP backend sends the ML Metadata execution state (driver
# resolve.go: GetLastKnownState().String(): COMPLETE, or CACHED for a cached task), and
# newer KFP, without ML Metadata, maps SUCCEEDED/SKIPPED/CACHED to COMPLETE
# (pipelineTaskFinalStatusState). Anything else (FAILED, CANCELED, CANCELLED, ...) is a failure.
SUCCESS_STATES = frozenset({"SUCCEEDED", "COMPLETE", "CACHED", "SKIPPED"})


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# -- what to run -----------------------------------------------------------------------------


def study_key(input_uri: str) -> str:
    """Pseudonymous, stable name of a study input (sha256 of its URI, trailing / ignored).
    A local folder name that is not UTF-8 hashes as its bytes (``os.fsencode``'s escape)."""
    return hashlib.sha256(str(input_uri).rstrip("/").encode("utf-8", "surrogateescape")).hexdigest()[:32]


def params_hash(
    prompts,
    rules: str,
    resample: bool,
    min_volume_ml: float,
    maps: str = MapMode.AOVA,
    verifier_threshold: float | None = None,
) -> str:
    """Hash of what changes a study's results besides the model: the cohort's parameters
    (prompt order included) and the method's own defaults that the study pipeline runs with
    (the synthesis parameters), so a release that changes a default re-runs the studies done
    with the old one instead of mixing both in one cohort."""
    from dataclasses import asdict

    doc = {
        "prompts": [str(p) for p in prompts],
        "rules": str(rules),
        "resample": bool(resample),
        "min_volume_ml": float(min_volume_ml),
        "synthesis": asdict(SynthesisParams()),
    }
    if maps != MapMode.AOVA:  # only then: studies done before the option existed keep their hash
        doc["maps"] = str(maps)
    if verifier_threshold is not None:  # likewise: the model's own operating point
        doc["verifier_threshold"] = float(verifier_threshold)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def model_sha256(model_uri: str) -> str:
    """The model's identity: sha256 of its ``manifest.json`` (as ``ModelPackage.sha256``)."""
    raw = read_bytes(join(model_uri, MODEL_MANIFEST))
    if raw is None:
        raise InputError(model_uri, f"not a model package (no {MODEL_MANIFEST})")
    return hashlib.sha256(raw).hexdigest()


def check_has_verifier(model_uri: str) -> None:
    """ConfigError unless the model carries a lesion verifier (an operating point needs one):
    here, once, rather than in every batch task of the run."""
    raw = read_bytes(join(model_uri, MODEL_MANIFEST))
    try:
        networks = json.loads(raw or b"{}").get("networks", {})
    except ValueError:
        raise InputError(model_uri, f"{MODEL_MANIFEST} is not JSON") from None
    if not (networks.get(REFINE_HEAD) or {}).get("verifier"):
        raise ConfigError(NO_VERIFIER.format(model=model_uri))


def list_inputs(studies_uri: str = "", studies_csv: str = "") -> list[str]:
    """Study inputs: the ``input_uri`` column of ``studies_csv`` when given, else every
    sub-folder (sub-prefix) and ``.zip`` directly under ``studies_uri``. Names starting with
    ``.`` or ``_`` are left out."""
    if studies_csv:
        return _from_csv(studies_csv)
    if not studies_uri:
        raise ConfigError("give studies_uri (a folder or s3:// prefix of studies) or studies_csv")
    # One level only: a study holds hundreds of objects, a recursive listing would fetch them all.
    inputs = [
        c
        for c in list_children(studies_uri)
        if not c.name.startswith((".", "_")) and (c.is_dir or c.name.lower().endswith(".zip"))
    ]
    if is_s3(studies_uri):
        return [c.uri for c in inputs]
    return [str(Path(c.uri).resolve()) for c in inputs]


def _from_csv(studies_csv: str) -> list[str]:
    raw = read_bytes(studies_csv)
    if raw is None:
        raise InputError(studies_csv, "no such file")
    rows = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
    if "input_uri" not in (rows.fieldnames or []):
        raise InputError(studies_csv, "no input_uri column")
    here = None if is_s3(studies_csv) else Path(studies_csv).resolve().parent
    out: list[str] = []
    for row in rows:
        uri = (row.get("input_uri") or "").strip()
        if not uri:
            continue
        if here is not None and "://" not in uri and not Path(uri).is_absolute():
            uri = str(here / uri)  # relative paths are relative to the CSV
        if uri not in out:
            out.append(uri)
    return out


def marker_uri(results_uri: str, key: str) -> str:
    return join(results_uri, RUNS, f"{key}.json")


def run_uri(results_uri: str, run: str) -> str:
    return join(results_uri, RUNS, f"cohort-{run}")


def read_listing(results_uri: str, run: str) -> dict:
    listing = read_json(join(run_uri(results_uri, run), "listing.json"))
    if listing is None:
        raise InputError(run_uri(results_uri, run), "no listing.json: the listing step did not finish")
    return listing


def read_marker(results_uri: str, key: str) -> dict | None:
    return read_json(marker_uri(results_uri, key))


def plan_run(
    results_uri: str,
    run: str,
    *,
    studies_uri: str = "",
    studies_csv: str = "",
    model_uri: str,
    prompts,
    rules: str = "default",
    resample: bool = False,
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
    force: bool = False,
    maps: str = MapMode.AOVA,
    batch_size: int | None = None,
    max_parallel: int | None = None,
    verifier_threshold: float | None = None,
) -> dict:
    """List the inputs, split them into pending and skipped (done before with this model and
    these parameters; ``force`` runs everything), deal the pending ones into batches and lanes
    (:func:`diffugts.runners.batch.plan_batches`), and write the run's ``listing.json``."""
    from diffugts.runners.batch import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PARALLEL, plan_batches

    RefineParams(min_volume_ml, verifier_threshold)  # a bad operating point fails here, not in every batch
    phash = params_hash(prompts, rules, resample, min_volume_ml, maps, verifier_threshold)
    sha = model_sha256(model_uri)
    if verifier_threshold is not None:
        check_has_verifier(model_uri)
    pending, skipped = [], []
    for uri in list_inputs(studies_uri, studies_csv):
        key = study_key(uri)
        marker = None if force else read_json(marker_uri(results_uri, key))
        if (
            marker
            and marker.get("status") == "done"
            and marker.get("model_sha256") == sha
            and marker.get("params_hash") == phash
        ):
            skipped.append({"key": key, "input_uri": uri, "result": marker["result"]})
        else:
            pending.append({"key": key, "input_uri": uri, "model_sha256": sha, "params_hash": phash})
    plan = plan_batches(
        [item["key"] for item in pending], batch_size or DEFAULT_BATCH_SIZE, max_parallel or DEFAULT_MAX_PARALLEL
    )
    listing = {
        "run": run,
        "time": _now(),
        "diffugts_version": __version__,
        "model_sha256": sha,
        "params_hash": phash,
        "force": bool(force),
        "pending": pending,
        "skipped": skipped,
        **plan,
    }
    write_json(join(run_uri(results_uri, run), "listing.json"), listing)
    return listing


# -- one study's outcome -----------------------------------------------------------------------


def publish_result(report_dir: str | os.PathLike, results_uri: str) -> str:
    """Put a report folder where the report stage's upload puts it,
    ``<results_uri>/<StudyInstanceUID>/report``; returns that location. The UID must be a
    valid UID (:func:`diffugts.utils.uids.checked_uid`): header text never names a path."""
    report_dir = Path(report_dir)
    summary = json.loads((report_dir / report_artifact.MARKER).read_text())
    uid = checked_uid(summary["study"].get("study_instance_uid"), report_artifact.MARKER)
    if is_s3(results_uri):
        from diffugts.stages.report.upload import upload_report

        return upload_report(report_dir, uid, results_uri, meta={"lesions": len(summary.get("lesions", []))})
    return publish(report_dir, join(results_uri, uid, "report"), marker=report_artifact.MARKER)


class DuplicateStudy(DiffugtsError):
    """A second study input holds a study whose result another input already published."""

    metrics_reason = "duplicate"

    def __init__(self, owner_key: str):
        self.reason = (
            f"duplicate input: the same study (Study Instance UID) as study input {owner_key}, "
            "whose result stands; remove one of the two inputs"
        )
        super().__init__(self.reason)


class PublishError(DiffugtsError):
    """The result could not be written to ``results_uri`` (disk full, read-only, ...)."""

    metrics_reason = "storage"

    def __init__(self, err: BaseException):
        detail = getattr(err, "strerror", None) or " ".join(str(err).split())[:200] or type(err).__name__
        self.reason = f"cannot publish the result: {detail}"
        super().__init__(self.reason)


class RecordedFailure(DiffugtsError):
    """A failure a step of this run already recorded in the study's marker."""

    def __init__(self, marker: dict):
        self.metrics_reason = marker.get("reason_code") or "internal"
        self.reason = marker.get("reason") or "failed"
        super().__init__(self.reason)


def owner_uri(results_uri: str, uid: str) -> str:
    """Where the input that published ``uid``'s result is recorded (the UID hashed)."""
    return join(results_uri, RUNS, OWNERS, hashlib.sha256(uid.encode()).hexdigest()[:32] + ".json")


def mark_done(
    report_dir: str | os.PathLike, results_uri: str, key: str, *, model_sha256: str, params_hash: str, run: str = ""
) -> dict:
    """Publish a finished study's report, then write its ``done`` marker (in that order: a
    marker always points at a complete result). A done marker from an earlier run is
    withdrawn before the result changes; if publishing fails the marker says ``failed``
    (stage ``publish``) and the error is raised as a :class:`DiffugtsError`."""
    summary = json.loads((Path(report_dir) / report_artifact.MARKER).read_text())
    base = {
        "key": key,
        "model_sha256": model_sha256,
        "params_hash": params_hash,
        "run": run,
        "diffugts_version": __version__,
    }
    try:
        uid = checked_uid(summary["study"].get("study_instance_uid"), report_artifact.MARKER)
        owner = read_json(owner_uri(results_uri, uid))
        if owner and owner.get("key") != key:
            raise DuplicateStudy(owner["key"])
        write_json(marker_uri(results_uri, key), {**base, "status": "publishing", "time": _now()})
        write_json(owner_uri(results_uri, uid), {"key": key, "run": run, "time": _now()})
        result = publish_result(report_dir, results_uri)
    except Exception as exc:
        err = exc if isinstance(exc, DiffugtsError) else PublishError(exc)
        _mark_publish_failed(results_uri, base, err)
        if err is exc:
            raise
        raise err from None
    marker = {**base, "status": "done", "result": result, "study_key": summary["study"]["study_key"], "time": _now()}
    write_json(marker_uri(results_uri, key), marker)
    return marker


def _mark_publish_failed(results_uri: str, base: dict, err: DiffugtsError) -> None:
    from diffugts.stages.report.cohort import reason_text
    from diffugts.utils.prometheus import reason_for

    with contextlib.suppress(Exception):  # the store may be the problem: the error is raised anyway
        write_json(
            marker_uri(results_uri, base["key"]),
            {
                **base,
                "status": "failed",
                "stage": "publish",
                "reason_code": reason_for(err),
                "reason": reason_text(err),
                "time": _now(),
            },
        )


class LaterStageFailure(DiffugtsError):
    """Ingestion works on the study: one of the later stages failed."""

    metrics_reason = "internal"
    DEFAULT = (
        "ingestion succeeds on a re-check, so a later stage (attention maps, synthesis, refinement "
        "or report) failed: see that task's log in this run"
    )

    def __init__(self, reason: str = DEFAULT):
        self.reason = reason
        super().__init__(reason)


def diagnose(input_uri: str, rules: str = "default", resample: bool = False) -> tuple[str, BaseException]:
    """(stage, error) of a study the pipeline could not finish. KFP hands no error text to
    later steps, so ingestion is re-run here (in memory, nothing written): a bad input fails
    the same way the ingestion stage did; otherwise a later stage is to blame."""
    from diffugts.stages.ingest import load_series

    try:
        load_series(input_uri, rules=rules, resample_grid=resample, show_progress=False)
    except Exception as exc:
        return "ingest", exc
    return "pipeline", LaterStageFailure()


def record_failure(results_uri: str, run: str, item: dict, stage: str, exc: BaseException, work: Path) -> dict:
    """Write ``failed.json`` for a study of this run and its ``failed`` marker; returns the
    record, with ``source``: its folder (a source for the cohort report)."""
    from diffugts.stages.report.cohort import FAILED_MARKER, write_failure

    local = work / item["key"]
    record = write_failure(local, stage, exc)
    record.update(input_key=item["key"], input_uri=item["input_uri"], run=run)
    atomic.write_json(local / FAILED_MARKER, record)
    source = publish(local, join(run_uri(results_uri, run), "failed", item["key"]), marker=FAILED_MARKER)
    write_json(
        marker_uri(results_uri, item["key"]),
        {
            "key": item["key"],
            "status": "failed",
            "model_sha256": item.get("model_sha256"),
            "params_hash": item.get("params_hash"),
            "stage": stage,
            "reason_code": record["reason_code"],
            "reason": record["reason"],
            "failure": source,
            "run": run,
            "time": _now(),
            "diffugts_version": __version__,
        },
    )
    return {**record, "source": source}


# -- the run's results ----------------------------------------------------------------------


def collect_run(
    results_uri: str, run: str, out_dir: str | os.PathLike, *, rules: str = "default", resample: bool = False
) -> dict:
    """The cohort report of run ``run`` into ``out_dir`` (then copied to ``cohort/<run>``):
    studies done in this run, studies skipped as done before, and failed studies with their
    reasons (each recorded in ``failed/<key>/failed.json`` and its marker)."""
    from diffugts.stages.report.cohort import cohort_report

    listing = read_listing(results_uri, run)
    out = Path(out_dir)
    # result -> the input key that holds it: a second input on one result is a duplicate.
    owners = {s["result"]: s["key"] for s in listing["skipped"]}
    sources = list(owners)
    failed: list[tuple[dict, str | None, DiffugtsError | None]] = []
    records: list[dict] = []
    for item in listing["pending"]:
        marker = read_json(marker_uri(results_uri, item["key"])) or {}
        if (
            marker.get("status") == "done"
            and marker.get("model_sha256") == item["model_sha256"]
            and marker.get("params_hash") == item["params_hash"]
        ):
            if marker["result"] in owners:
                failed.append((item, "publish", DuplicateStudy(owners[marker["result"]])))
                continue
            owners[marker["result"]] = item["key"]
            sources.append(marker["result"])
        elif marker.get("status") == "failed" and marker.get("run") == run and marker.get("failure"):
            # Recorded by its batch with the real error (diffugts.runners.batch): nothing to diagnose.
            records.append(
                {
                    "input_key": item["key"],
                    "stage": marker["stage"],
                    "reason_code": marker["reason_code"],
                    "reason": marker["reason"],
                    "source": marker["failure"],
                }
            )
            sources.append(marker["failure"])
        elif marker.get("status") == "failed" and marker.get("stage") == "publish" and marker.get("run") == run:
            # A failed publish whose failure record could not be written (mark_done's marker).
            failed.append((item, "publish", RecordedFailure(marker)))
        else:
            failed.append((item, None, None))
    work = out.parent / f".{out.name}.failures"
    diagnosed = 0
    try:
        for item, known_stage, known in failed:
            stage: str
            exc: BaseException
            if known_stage is not None and known is not None:
                stage, exc = known_stage, known
            elif diagnosed < MAX_DIAGNOSED:
                diagnosed += 1
                stage, exc = diagnose(item["input_uri"], rules, resample)
            else:
                stage, exc = "pipeline", LaterStageFailure(f"not diagnosed (over {MAX_DIAGNOSED} failures in one run)")
            records.append(record_failure(results_uri, run, item, stage, exc, work))
            sources.append(records[-1]["source"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = cohort_report(sources, out, link_base=join(results_uri, COHORT, run))  # where it is published
    summary.update(
        run=run,
        listed=len(listing["pending"]) + len(listing["skipped"]),
        skipped=len(listing["skipped"]),
        processed=len(listing["pending"]),
        failures=[
            {"key": r["input_key"], "stage": r["stage"], "reason_code": r["reason_code"], "reason": r["reason"]}
            for r in records
        ],
    )
    summary["report"] = publish(out, join(results_uri, COHORT, run), marker="cohort.json", meta={"run": run})
    return summary


def run_markdown(summary: dict) -> str:
    """The KFP Markdown view of a cohort run (keys, not input paths)."""
    lines = [
        f"# DiffuGTS cohort run {md(summary['run'])}",
        "",
        f"{summary['listed']} studies listed: {summary['skipped']} skipped (done before with this model "
        f"and these parameters), {summary['processed']} processed; {summary['done']} done and "
        f"{summary['failed']} failed in the report; {summary['lesions']} lesions.",
        "",
        f"Cohort report: {md(summary['report'])}",
    ]
    if summary.get("failures"):
        lines += ["", "| study input key | stage | reason code | reason |", "|---|---|---|---|"]
        # Key, stage and reason code are this code's own identifiers; the reason is text.
        lines += [
            f"| {r['key']} | {r['stage']} | {r['reason_code']} | {md(r['reason'])} |" for r in summary["failures"]
        ]
    return "\n".join(lines) + "\n"


def run_succeeded(state: str) -> bool:
    """Whether an exit handler's final state means the run went through (see SUCCESS_STATES)."""
    return str(state).strip().upper() in SUCCESS_STATES


def finish_run(results_uri: str, run: str, state: str, error: str = "", gateway: str | None = None) -> dict:
    """The exit handler: write ``_runs/cohort-<run>.json`` (the pipeline's final state as the
    backend sent it, whether that is a success, and the counts) and push the run's gauges to
    the Pushgateway when one is configured."""
    listing = read_json(join(run_uri(results_uri, run), "listing.json"))
    cohort = read_json(join(results_uri, COHORT, run, "cohort.json"))
    record = {
        "run": run,
        "state": state,
        "succeeded": run_succeeded(state),
        "error": error,
        "time": _now(),
        "diffugts_version": __version__,
        "listed": None,
        "skipped": None,
        "processed": None,
        "done": None,
        "failed": None,
        "report": None,
    }
    if listing is not None:
        record.update(
            listed=len(listing["pending"]) + len(listing["skipped"]),
            skipped=len(listing["skipped"]),
            processed=len(listing["pending"]),
        )
    if cohort is not None:
        record.update(done=cohort["done"], failed=cohort["failed"], report=join(results_uri, COHORT, run))
    write_json(join(results_uri, RUNS, f"cohort-{run}.json"), record)
    _push_metrics(record, gateway)
    return record


def _push_metrics(record: dict, gateway: str | None) -> bool:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

    from diffugts.utils import prometheus as metrics

    studies = GaugeMetricFamily(
        "diffugts_cohort_studies", "Studies of the last cohort run, by outcome.", labels=["outcome"]
    )
    for outcome in ("done", "failed", "skipped"):
        studies.add_metric([outcome], float(record.get(outcome) or 0))
    ok = record["succeeded"] and not record.get("failed") and record.get("done") is not None
    families = [
        studies,
        GaugeMetricFamily(
            "diffugts_cohort_last_run_succeeded",
            "1 if the last cohort run finished with every study done, else 0.",
            value=float(ok),
        ),
        GaugeMetricFamily(
            "diffugts_cohort_last_run_timestamp_seconds",
            "Unix time the last cohort run ended.",
            value=dt.datetime.now(dt.UTC).timestamp(),
        ),
    ]
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Fixed(families))
    return metrics.push(registry, "cohort", gateway)


class _Fixed:
    """A collector that yields fixed metric families (one push, no global registry)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families
