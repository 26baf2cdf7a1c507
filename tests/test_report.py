"""Reporting stage: DICOM SEG / SR read back and validated, human and cohort reports, derived
series, upload to a real S3 server, metrics pushed to a real Pushgateway, the component."""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scipy import ndimage

from dicomfactory import write_series
from diffugts.artifacts import lesions as lesions_artifact
from diffugts.artifacts.files import write_image
from diffugts.artifacts.study import load_study
from diffugts.cli import main
from diffugts.errors import InputError
from diffugts.phantom import CaseSpec, generate_case, write_case
from diffugts.stages.ingest import ingest
from diffugts.stages.lesions import write_lesion_artifact
from diffugts.stages.report import make_report, study_key
from diffugts.stages.report.cohort import cohort_report
from diffugts.stages.report.upload import upload_report
from diffugts.storage import MANIFEST, ObjectStore
from diffugts.utils import atomic, prometheus as metrics

MODEL = {"name": "demo-tiny", "sha256": "c0ffee" + "0" * 58}
TARGETS = [
    {"prompt": {"text": "liver tumor", "organ": "liver"}, "score": 0.91},
    {"prompt": {"text": "kidney cyst", "organ": "kidney"}, "score": 0.12},
]


def dciodvfy_errors(path: Path) -> list[str]:
    binary = shutil.which("dciodvfy")
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("dciodvfy not found (Debian package dicom3tools)")
        pytest.skip("dciodvfy not found (Debian package dicom3tools)")
    out = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A phantom CT with two liver lesions, its study / lesion / attention / synthesis
    artifacts (ground truth standing in for the model), and the report made from them."""
    root = tmp_path_factory.mktemp("report")
    spec = CaseSpec(seed=1, index=3, healthy_fraction=0.0)
    case = generate_case(spec)
    assert [les["organ"] for les in case.lesions] == ["liver", "liver"]
    healthy = generate_case(replace(spec, healthy=True)).image.astype(np.float32)
    case_dir = write_case(case, root / "cases")
    ingest(case_dir / "dicom", root / "study", show_progress=False)
    study = load_study(root / "study")
    liver = case.lesion_map > 0
    prob = np.clip(ndimage.gaussian_filter(liver.astype(np.float32), 1.5) * 1.3, 0, 1).astype(np.float32)
    nothing = np.zeros_like(liver)
    write_lesion_artifact(
        root / "lesions", study, TARGETS, [liver, nothing], [prob, None], min_volume_ml=0.1, model=MODEL
    )
    with atomic.staging_dir(root / "attention", marker="attention.json") as stage:
        (stage / "maps").mkdir()
        entries = []
        for n, (t, p) in enumerate(zip(TARGETS, [prob, nothing.astype(np.float32)])):
            write_image(stage / f"maps/{n:02d}.nii.gz", p, study.geometry)
            entries.append({"index": n, "prompt": t["prompt"], "score": t["score"], "map": f"maps/{n:02d}.nii.gz"})
        atomic.write_json(stage / "attention.json", {"stage": "attend", "model": MODEL, "targets": entries})
    with atomic.staging_dir(root / "synthesis", marker="synthesis.json") as stage:
        write_image(stage / "pseudo_healthy.nii.gz", healthy, study.geometry)
        atomic.write_json(
            stage / "synthesis.json", {"stage": "synthesize", "files": {"pseudo_healthy": "pseudo_healthy.nii.gz"}}
        )
    summary = make_report(
        root / "study",
        root / "lesions",
        root / "report",
        attention_dir=root / "attention",
        synthesis_dir=root / "synthesis",
        pushgateway="",
    )
    return {
        "root": root,
        "study": study,
        "case": json.loads((case_dir / "case.json").read_text()),
        "summary": summary,
        "out": root / "report",
        "healthy": healthy,
        "masks": lesions_artifact.read(root / "lesions", study.geometry).lesion_masks(study.geometry),
    }


def test_report_folder(world):
    out, summary = world["out"], world["summary"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(summary))
    for name in ("seg.dcm", "sr.dcm", "report.md", "summary.md", "report.html", "metrics.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "attention_00.png",
        "attention_01.png",
        "lesion_01.png",
        "lesion_02.png",
        "synthesis_lesion_01.png",
        "synthesis_lesion_02.png",
    ]
    assert [les["segment_number"] for les in summary["lesions"]] == [1, 2]
    kfp = json.loads((out / "metrics.json").read_text())
    assert kfp["lesions"] == 2 and kfp["lesions_01_kidney_cyst"] == 0 and kfp["score_00_liver_tumor"] == 0.91
    assert kfp["total_volume_ml"] == pytest.approx(sum(les["volume_ml"] for les in summary["lesions"]), abs=1e-3)


def test_seg_reads_back_with_the_same_mask_and_geometry(world):
    study, masks = world["study"], world["masks"]
    seg = hd.seg.segread(world["out"] / "seg.dcm")
    instances = study.series["instances"]
    assert seg.FrameOfReferenceUID == study.series["frame_of_reference_uid"]
    assert seg.StudyInstanceUID == study.series["study_instance_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series["series_instance_uid"]
    assert seg.SegmentationType == "BINARY"
    # every voxel, every lesion, indexed by the source instances
    pixels = seg.get_pixels_by_source_instance(
        [i["sop_instance_uid"] for i in instances], segment_numbers=[1, 2], assert_missing_frames_are_empty=True
    )
    assert pixels.shape == (*study.geometry.shape, 2)
    for n, lesion_id in enumerate([1, 2]):
        assert np.array_equal(pixels[..., n].astype(bool), masks[lesion_id].full(study.geometry.shape))
    # each frame sits exactly at the position of the source instance it references
    position = {i["sop_instance_uid"]: np.array(i["position_lps_mm"]) for i in instances}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient, position[src], atol=1e-4)
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, study.geometry.spacing[[1, 0]])
    np.testing.assert_allclose(
        shared.PlaneOrientationSequence[0].ImageOrientationPatient,
        np.concatenate([study.geometry.direction[:, 0], study.geometry.direction[:, 1]]),
    )
    # the whole-volume view agrees with the study grid in patient coordinates
    volume = seg.get_volume(segment_numbers=[1])
    corner = volume.affine @ np.array([0, 0, 0, 1.0])
    k, j, i = np.round(np.linalg.solve(study.geometry.affine, corner)[[2, 1, 0]], 4)
    assert (j, i) == (0, 0) and float(k).is_integer()
    for sd in seg.SegmentSequence:
        assert sd.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # Neoplasm
        assert sd.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert sd.AnatomicRegionSequence[0].CodeValue == "10200004"  # Liver
        algo = sd.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "diffugts" and MODEL["sha256"] in algo.AlgorithmParameters
        assert sd.SegmentAlgorithmType == "AUTOMATIC" and sd.TrackingID == f"lesion {sd.SegmentNumber}"


def test_dicom_outputs_pass_dciodvfy(world):
    out = world["out"]
    for path in (out / "seg.dcm", out / "sr.dcm", out / "pseudo_healthy" / "00001.dcm"):
        assert dciodvfy_errors(path) == [], path


def test_sr_holds_the_measurements_and_references(world):
    sr = hd.sr.srread(world["out"] / "sr.dcm")
    seg = pydicom.dcmread(world["out"] / "seg.dcm")
    lesions = {les["id"]: les for les in world["summary"]["lesions"]}
    tracking = {sd.SegmentNumber: sd.TrackingUID for sd in seg.SegmentSequence}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        lesion_id = int(group.tracking_identifier.split()[-1])
        rec = lesions[lesion_id]
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [rec["segment_number"]]
        assert group.tracking_uid == tracking[rec["segment_number"]]
        assert group.finding_type.value == "108369006"
        got = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
        assert got["Volume"] == (pytest.approx(rec["volume_ml"]), "ml")
        assert got["Long axis"] == (pytest.approx(rec["longest_axial_diameter_mm"]), "mm")
        assert got["Attenuation Coefficient"] == (pytest.approx(rec["mean_intensity"]), "[hnsf'U]")
    # the prompt that found nothing is reported as absent
    (absent,) = [g for g in sr.content.get_image_measurement_groups() if "kidney cyst" in g.tracking_identifier]
    evaluation = absent.get_qualitative_evaluations()[0]
    assert evaluation.value.value == "121054"  # Absent
    evidence = {
        item.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for series in s.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence


def test_pseudo_healthy_series(world):
    study = world["study"]
    files = sorted((world["out"] / "pseudo_healthy").iterdir())
    assert len(files) == study.geometry.shape[0]
    series_uids = set()
    for k in (0, 20, len(files) - 1):
        ds = pydicom.dcmread(files[k])
        src = study.series["instances"][k]
        series_uids.add(ds.SeriesInstanceUID)
        assert ds.FrameOfReferenceUID == study.series["frame_of_reference_uid"]
        assert ds.SeriesInstanceUID != study.series["series_instance_uid"]
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src["sop_instance_uid"]
        np.testing.assert_allclose(ds.ImagePositionPatient, src["position_lps_mm"], atol=1e-4)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, np.rint(world["healthy"][k]))
    assert len(series_uids) == 1


def test_human_report_is_self_contained_and_free_of_identifiers(world):
    html = (world["out"] / "report.html").read_text()
    md = (world["out"] / "report.md").read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", html), "external reference in the HTML"
    assert "http://" not in html and "https://" not in html
    assert html.count('src="data:image/png;base64,') == 6
    assert "<table>" in html and "liver tumor" in html and "kidney cyst" in html
    key = study_key(world["study"].series["study_instance_uid"])
    for rec in world["summary"]["lesions"]:
        assert f'<td class="num">{rec["volume_ml"]:.2f}</td>' in html
    assert (
        md.count("](images/") == 6
        and f"| 1 | liver tumor | liver | {world['summary']['lesions'][0]['volume_ml']:.2f}" in md
    )
    assert "](" not in (world["out"] / "summary.md").read_text()
    dicom = world["case"]["dicom"] or {}
    series = world["study"].series
    secrets_ = [
        series["study_instance_uid"],
        series["series_instance_uid"],
        series["frame_of_reference_uid"],
        "PHANTOM^",
        "PH-1-0003",
        *[str(v) for k, v in dicom.items() if "patient" in k.lower()],
    ]
    for text in (html, md):
        assert key in text
        for secret in secrets_:
            assert secret not in text


def test_no_lesions_resampled_grid_and_mr(tmp_path):
    # an oblique series resampled at ingestion: SEG frames on the study grid, not the source slices
    a = np.radians(25)
    ori = (np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0)
    write_series(
        tmp_path / "ct",
        n=10,
        rows=24,
        cols=24,
        pixel_spacing=(1, 1),
        orientation=ori,
        origin=(0, 0, 0),
        pixels=np.full((10, 24, 24), 1064, np.int16),
        tweak=lambda k, ds: setattr(ds, "PatientSex", "O"),
    )
    ingest(tmp_path / "ct", tmp_path / "study", resample_grid=True, show_progress=False)
    study = load_study(tmp_path / "study")
    mask = np.zeros(study.geometry.shape, bool)
    mask[3:7, 10:18, 12:20] = True
    prompt = [{"prompt": {"text": "pancreatic tumor", "organ": "pancreas"}, "score": 0.5}]
    write_lesion_artifact(tmp_path / "lesions", study, prompt, [mask], min_volume_ml=0.01)
    assert study.series["resampled_from"] is not None
    make_report(tmp_path / "study", tmp_path / "lesions", tmp_path / "out", pushgateway="")
    seg = hd.seg.segread(tmp_path / "out" / "seg.dcm")
    vol = seg.get_volume()
    assert int(vol.array.sum()) == int(mask.sum())
    for index in np.argwhere(vol.array)[::17]:  # SEG voxels map into the mask in patient space
        lps = vol.affine @ np.array([*index[:3], 1.0])
        ijk = np.linalg.solve(study.geometry.affine, lps)[:3]
        np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-3)
        assert mask[tuple(np.round(ijk[::-1]).astype(int))]
    assert seg.SegmentSequence[0].AnatomicRegionSequence[0].CodeValue == "15776009"  # Pancreas
    for name in ("seg.dcm", "sr.dcm"):
        assert dciodvfy_errors(tmp_path / "out" / name) == []

    # nothing found: no SEG, an SR saying so, still valid
    write_lesion_artifact(tmp_path / "none", study, prompt, [np.zeros_like(mask)])
    summary = make_report(tmp_path / "study", tmp_path / "none", tmp_path / "out0", pushgateway="")
    assert summary["files"]["seg"] is None and not (tmp_path / "out0" / "seg.dcm").exists()
    sr = hd.sr.srread(tmp_path / "out0" / "sr.dcm")
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    assert dciodvfy_errors(tmp_path / "out0" / "sr.dcm") == []
    assert "No lesion above the minimum volume" in (tmp_path / "out0" / "report.html").read_text()

    # MR: mean signal intensity without units
    write_series(tmp_path / "mr", n=8, rows=20, cols=20, modality="MR", pixels=np.full((8, 20, 20), 300, np.int16))
    ingest(tmp_path / "mr", tmp_path / "mrstudy", show_progress=False)
    mr = load_study(tmp_path / "mrstudy")
    m = np.zeros(mr.geometry.shape, bool)
    m[2:5, 5:10, 5:10] = True
    write_lesion_artifact(
        tmp_path / "mrles", mr, [{"prompt": {"text": "brain tumor", "organ": "brain"}}], [m], min_volume_ml=0.01
    )
    make_report(tmp_path / "mrstudy", tmp_path / "mrles", tmp_path / "mrout", pushgateway="")
    group = hd.sr.srread(tmp_path / "mrout" / "sr.dcm").content.get_volumetric_roi_measurement_groups()[0]
    got = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
    assert got["MR signal intensity"] == (pytest.approx(300.0), "1")
    for name in ("seg.dcm", "sr.dcm"):
        assert dciodvfy_errors(tmp_path / "mrout" / name) == []


def test_bad_input_fails_with_one_line_and_failed_json(world, tmp_path, capsys):
    (tmp_path / "lesions").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # a stale result must not survive a failure
    code = main(
        ["report", "--study", str(world["root"] / "study"), "--lesions", str(tmp_path / "lesions"), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a lesion artifact (no lesions.json" in err
    failed = json.loads((out / "failed.json").read_text())
    assert failed["reason_code"] == "bad_input" and "lesions.json" in failed["reason"]
    assert str(tmp_path) not in failed["reason"]  # paths can hold patient names
    assert not (out / "report.json").exists()


def test_cohort_report(world, tmp_path):
    failed = tmp_path / "failed"
    failed.mkdir()
    with pytest.raises(InputError, match="not a lesion artifact"):
        make_report(world["root"] / "study", tmp_path / "nope", failed, pushgateway="")
    summary = cohort_report([str(world["out"]), str(failed), str(tmp_path / "never-ran")], tmp_path / "cohort")
    assert (summary["studies"], summary["done"], summary["failed"], summary["lesions"]) == (3, 1, 2, 2)
    assert summary["failure_reasons"] == {"bad_input": 1, "internal": 1}
    rows = (tmp_path / "cohort" / "cohort.csv").read_text().splitlines()
    assert rows[0].startswith("study_key,status,reason_code,reason,modality,prompts,lesions,total_volume_ml")
    done = rows[1].split(",")
    assert done[1] == "done" and done[6] == "2" and done[0] == study_key(world["study"].series["study_instance_uid"])
    assert rows[2].split(",")[1:3] == ["failed", "bad_input"]
    assert rows[3].split(",")[1:3] == ["failed", "internal"]
    lesion_rows = (tmp_path / "cohort" / "lesions.csv").read_text().splitlines()
    assert len(lesion_rows) == 3 and lesion_rows[1].split(",")[2] == "liver tumor"
    html = (tmp_path / "cohort" / "cohort.html").read_text()
    assert "3 studies: 1 done, 2 failed" in html and 'src="data:image/png;base64,' in html
    assert world["study"].series["study_instance_uid"] not in html
    assert json.loads((tmp_path / "cohort" / "cohort.json").read_text())["lesions"] == 2


def test_upload_publishes_under_the_study_uid_manifest_last(world, s3_env):
    order: list[str] = []
    store = ObjectStore()
    upload_file, put_bytes = store._upload, store.put_bytes
    store._upload = lambda path, uri: (order.append(uri), upload_file(path, uri))[1]
    store.put_bytes = lambda uri, *a, **k: (order.append(uri), put_bytes(uri, *a, **k))[1]
    uid = world["study"].series["study_instance_uid"]
    uri = upload_report(world["out"], uid, store=store)
    assert uri == f"s3://{s3_env.bucket}/{uid}/report"
    assert order[-1] == f"{uri}/{MANIFEST}" and len(order) == len(list(world["out"].rglob("*.*"))) + 1
    manifest = json.loads(store.get_bytes(f"{uri}/{MANIFEST}"))
    assert {f["path"] for f in manifest["files"]} >= {"report.json", "seg.dcm", "sr.dcm", "report.html"}
    assert manifest["meta"]["stage"] == "report"
    fetched = store.fetch_artifact(uri, world["root"] / "fetched")
    assert (world["root"] / "fetched" / "seg.dcm").read_bytes() == (world["out"] / "seg.dcm").read_bytes()
    assert len(fetched) == len(manifest["files"])


def _samples(url: str, job: str) -> list:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.labels.get("job") == job]


def _value(samples, name: str, **labels) -> float:
    (value,) = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return value


def test_metrics_pushed_to_a_real_pushgateway(pushgateway_url):
    job = "diffugts-test-unit"
    assert metrics.record_stage(
        "attend", 42.0, lesions=None, gpu_peak=3 * 2**30, model=MODEL, gateway=pushgateway_url, job=job
    )
    assert metrics.record_stage("attend", 0.7, gateway=pushgateway_url, job=job, rejected="model_error")
    assert metrics.record_stage("attend", 12.0, gateway=pushgateway_url, job=job, model=MODEL)
    s = _samples(pushgateway_url, job)
    labels = {"stage": "attend"}
    assert _value(s, "diffugts_studies_processed_total", **labels) == 2
    assert _value(s, "diffugts_studies_rejected_total", reason="model_error", **labels) == 1
    assert _value(s, "diffugts_studies_rejected_total", reason="bad_input", **labels) == 0
    assert _value(s, "diffugts_stage_duration_seconds_count", **labels) == 3
    assert _value(s, "diffugts_stage_duration_seconds_sum", **labels) == pytest.approx(54.7)
    assert _value(s, "diffugts_stage_duration_seconds_bucket", le="1", **labels) == 1
    assert _value(s, "diffugts_stage_duration_seconds_bucket", le="30", **labels) == 2
    assert _value(s, "diffugts_stage_duration_seconds_bucket", le="+Inf", **labels) == 3
    assert _value(s, "diffugts_gpu_memory_peak_bytes", **labels) == 0  # last run: this CPU process
    assert _value(s, "diffugts_build_info", model_sha256=MODEL["sha256"], version="0.1.0", **labels) == 1
    assert _value(s, "diffugts_last_success_timestamp_seconds", **labels) > 1.7e9
    # never a UID or a patient name in a label
    for sample in s:
        for value in sample.labels.values():
            assert not re.match(r"^\d+(\.\d+){3,}$", value) and "^" not in value and "PHANTOM" not in value


def test_report_cli_uploads_and_pushes(world, s3_env, pushgateway_url, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        [
            "report",
            "--study",
            str(world["root"] / "study"),
            "--lesions",
            str(world["root"] / "lesions"),
            "--out",
            str(out),
            "--upload",
            "--pushgateway",
            pushgateway_url,
            "--max-pictures",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    uid = world["study"].series["study_instance_uid"]
    assert f"2 lesions reported -> {out}, published to s3://{s3_env.bucket}/{uid}/report" in capsys.readouterr().out
    assert ObjectStore().artifact_complete(f"s3://{s3_env.bucket}/{uid}/report")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["lesion_01.png"]
    s = _samples(pushgateway_url, "diffugts")
    assert _value(s, "diffugts_lesions_found_total", stage="report") >= 2
    assert _value(s, "diffugts_studies_processed_total", stage="report") >= 1
    assert _value(s, "diffugts_build_info", stage="report", model="demo-tiny") == 1
    for sample in s:
        assert uid not in sample.labels.values()


def test_metric_labels_and_reasons(monkeypatch):
    monkeypatch.delenv(metrics.ENV_GATEWAY, raising=False)
    from diffugts.errors import InputError
    from diffugts.storage import StoreUnavailable

    with pytest.raises(ValueError):
        metrics.check_label("model", "1.2.840.113619.2.55.3")  # a UID
    with pytest.raises(ValueError):
        metrics.check_label("model", "DOE^JOHN")
    with pytest.raises(ValueError):
        metrics.check_label("reason", "disk_full")
    with pytest.raises(ValueError):
        metrics.build_registry("Report Stage", 1.0)
    assert metrics.reason_for(InputError("/x", "no files found")) == "no_series"
    assert metrics.reason_for(InputError("/x", "not on the study grid")) == "bad_input"
    assert metrics.reason_for(StoreUnavailable("s3://b/k", "down")) == "storage"
    assert metrics.reason_for(KeyError("x")) == "internal"
    assert metrics.record_stage("report", 1.0, gateway=None) is False  # no gateway: a no-op
    monkeypatch.setenv(metrics.ENV_GATEWAY, "http://127.0.0.1:9")
    assert metrics.gateway_url("") is None and metrics.gateway_url() == "http://127.0.0.1:9"
    with pytest.raises(metrics.ConfigError):
        metrics.gateway_url("pushgateway:9091/metrics")
    # a gateway that is down costs a warning, not the stage
    assert metrics.record_stage("report", 1.0, gateway="http://127.0.0.1:9") is False


@pytest.mark.slow
def test_component_runs_locally(world, tmp_path, monkeypatch):
    pytest.importorskip("kfp")
    import warnings

    from kfp import dsl, local

    from components.report import report

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.delenv(metrics.ENV_GATEWAY, raising=False)
    warnings.filterwarnings("ignore", module=r"kfp\.local(\..*)?$")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    @dsl.pipeline
    def only_report(study_uri: str, lesions_uri: str, attention_uri: str) -> dsl.HTML:
        study = dsl.importer(artifact_uri=study_uri, artifact_class=dsl.Dataset)
        lesions = dsl.importer(artifact_uri=lesions_uri, artifact_class=dsl.Dataset)
        attention = dsl.importer(artifact_uri=attention_uri, artifact_class=dsl.Dataset)
        task = report(study=study.output, lesions=lesions.output, attention=attention.output, max_pictures=1)
        return task.outputs["html"]

    root = world["root"]
    task = only_report(
        study_uri=str(root / "study"), lesions_uri=str(root / "lesions"), attention_uri=str(root / "attention")
    )
    html = Path(task.outputs["Output"].path).read_text()
    assert html.count('src="data:image/png;base64,') == 3  # one lesion, two attention maps
    folder = Path(task.outputs["Output"].path).parent.parent
    assert any(p.name == "report.json" for p in folder.rglob("report.json"))
    assert sys.modules.get("kfp") is not None


def test_overlapping_prompts_give_overlapping_segments(world, tmp_path):
    # two prompts finding the same lesion: each keeps all its voxels in its own segment
    study = world["study"]
    both = world["masks"][1].full(study.geometry.shape) | world["masks"][2].full(study.geometry.shape)
    first = world["masks"][1].full(study.geometry.shape)
    prompts = [
        {"prompt": {"text": "liver tumor", "organ": "liver"}},
        {"prompt": {"text": "hepatocellular carcinoma", "organ": "liver"}},
    ]
    write_lesion_artifact(tmp_path / "lesions", study, prompts, [both, first], min_volume_ml=0.1)
    summary = make_report(
        world["root"] / "study", tmp_path / "lesions", tmp_path / "out", pushgateway="", max_lesion_pictures=0
    )
    assert [(les["id"], les["target"]) for les in summary["lesions"]] == [(1, 0), (2, 0), (3, 1)]
    seg = hd.seg.segread(tmp_path / "out" / "seg.dcm")
    pixels = seg.get_pixels_by_source_instance(
        [i["sop_instance_uid"] for i in study.series["instances"]], segment_numbers=[1, 2, 3], skip_overlap_checks=True
    )
    assert np.array_equal(pixels[..., 0].astype(bool), first) and np.array_equal(pixels[..., 2].astype(bool), first)
    assert dciodvfy_errors(tmp_path / "out" / "seg.dcm") == []


def test_cohort_html_puts_findings_first_and_links_each_study(world, tmp_path):
    from diffugts.stages.report.human import DISCLAIMER

    failed = tmp_path / "failed"
    failed.mkdir()
    with pytest.raises(InputError, match="not a lesion artifact"):
        make_report(world["root"] / "study", tmp_path / "nope", failed, pushgateway="")
    empty = tmp_path / "empty"  # a study without findings
    empty.mkdir()
    rec = json.loads((world["out"] / "report.json").read_text())
    (empty / "report.json").write_text(json.dumps({**rec, "lesions": [], "study": {**rec["study"], "study_key": "k0"}}))
    (empty / "report.html").write_text("<html></html>")
    published = tmp_path / "results" / "cohort" / "run-1"
    cohort_report([str(empty), str(failed), str(world["out"])], tmp_path / "cohort", link_base=str(published))
    html = (tmp_path / "cohort" / "cohort.html").read_text()
    assert DISCLAIMER in html
    rows = re.findall(r"<tr( class=\"\w+\")?><td>(.*?)</td><td>(\w+)</td>", html)
    assert [(cls, status) for cls, _, status in rows] == [
        (' class="found"', "done"),
        (' class="failed"', "failed"),
        ("", "done"),
    ]
    href = re.search(r'<td><a href="([^"]+)">' + re.escape(rec["study"]["study_key"]) + "</a></td>", html).group(1)
    assert (published / href).resolve() == (world["out"] / "report.html").resolve()
    assert "bad_input" in html  # the failed study's reason is on its row


@pytest.mark.parametrize("volumes", [[9.12], [0.4, 0.5, 0.9], [0.2, 3.0, 150.0]])
def test_volume_histogram_ticks_are_plain_numbers(volumes):
    import matplotlib.pyplot as plt

    from diffugts.stages.report.cohort import volume_figure

    fig = volume_figure(volumes)
    fig.canvas.draw()
    ax = fig.axes[0]
    xs = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    ys = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert xs and all(re.fullmatch(r"\d+(\.\d+)?", x.replace("\u2212", "-")) for x in xs), xs
    assert ys and all(re.fullmatch(r"\d+", y) for y in ys), ys
