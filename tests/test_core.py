"""The in-memory core (diffugts.core) and the typed artifacts (diffugts.artifacts): one package
open, one study read and one model-grid resampling per study, and the file-based stages giving
exactly what the core gives in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from diffugts.artifacts import (
    attention as attention_artifact,
    lesions as lesions_artifact,
    synthesis as synthesis_artifact,
)
from diffugts.artifacts.study import load_study
from diffugts.cli import main
from diffugts.errors import InputError
from diffugts.phantom import CaseSpec, generate_case, write_case
from modelfactory import random_package

PROMPTS = ["liver tumor", "kidney cyst"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_package(tmp_path_factory.mktemp("fused"), fused=True)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    spec = CaseSpec(seed=11, index=0, shape=(32, 64, 64), split="seen", healthy_fraction=0.0)
    return write_case(generate_case(spec), tmp_path_factory.mktemp("case"))


@pytest.fixture(scope="module")
def segmented(model, case, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    args = ["-q", "segment", str(case / "dicom"), "--out", str(out), "--model", str(model.root), "--no-report"]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert main(args) == 0
    return out


@pytest.mark.slow  # whole studies through every stage
def test_segment_opens_the_package_reads_and_resamples_the_study_once(model, case, tmp_path, monkeypatch):
    import diffugts.artifacts.study as study_module
    import diffugts.core as core_module
    import diffugts.models.package as package_module
    import diffugts.stages.preprocess as preprocess

    counts = {"open": 0, "verify": 0, "read": 0, "to_model": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(core_module, "open_package", counted("open", core_module.open_package))
    monkeypatch.setattr(package_module, "verify_files", counted("verify", package_module.verify_files))
    monkeypatch.setattr(study_module, "load_study", counted("read", study_module.load_study))
    monkeypatch.setattr(preprocess, "to_model", counted("to_model", preprocess.to_model))
    args = ["-q", "segment", str(case / "dicom"), "--out", str(tmp_path / "seg"), "--model", str(model.root)]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert main(args) == 0
    assert (tmp_path / "seg" / "report" / "report.json").is_file()
    assert counts == {"open": 1, "verify": 1, "read": 1, "to_model": 1}


@pytest.mark.slow  # whole studies through every stage
def test_the_file_stages_give_what_the_core_gives_in_memory(model, segmented):
    """`diffugts segment` (in memory, artifacts written as made) against the core run again
    from the written study: every map, mask, image and record the same."""
    from diffugts.core import Core

    study = load_study(segmented / "study")
    core = Core(str(model.root), "cpu")
    prepared = core.prepare(study)
    attention = core.attend(prepared, PROMPTS)
    synthesis = core.synthesize(prepared, attention)
    lesions = core.refine(prepared, attention, synthesis)

    written = attention_artifact.read(segmented / "attention", study.geometry)
    for n in range(len(PROMPTS)):
        np.testing.assert_array_equal(written.maps[n], attention.maps[n])
        np.testing.assert_array_equal(written.masks[n], attention.masks[n])
        np.testing.assert_array_equal(written.organs[n], attention.organs[n])
    written_syn = synthesis_artifact.read(segmented / "synthesis", study.geometry)
    np.testing.assert_array_equal(written_syn.pseudo_healthy, synthesis.pseudo_healthy)
    np.testing.assert_array_equal(written_syn.inpainted, synthesis.inpainted)
    written_les = lesions_artifact.read(segmented / "lesions", study.geometry)
    np.testing.assert_array_equal(written_les.instances, lesions.instances)
    assert written_les.summary == json.loads(json.dumps(lesions.summary))
    # The file-based refinement stage, reading those artifacts back, agrees too.
    assert (
        main(
            [
                "-q",
                "refine",
                str(segmented / "study"),
                "--attention",
                str(segmented / "attention"),
                "--synthesis",
                str(segmented / "synthesis"),
                "--model",
                str(model.root),
                "--out",
                str(segmented / "lesions-again"),
            ]
        )
        == 0
    )
    again = lesions_artifact.read(segmented / "lesions-again", study.geometry)
    np.testing.assert_array_equal(again.instances, lesions.instances)
    assert again.summary == written_les.summary


@pytest.mark.slow  # whole studies through every stage
def test_synthesis_of_an_empty_region_reads_no_weights(model, segmented, monkeypatch):
    import diffugts.models.package as package_module
    from diffugts.core import Core

    monkeypatch.setattr(package_module, "verify_files", lambda pkg: pytest.fail("checksummed"))
    core = Core(str(model.root), "cpu", verify=False)
    study = load_study(segmented / "study")
    result = core.synthesize(core.prepare(study), np.zeros(study.geometry.shape, bool))
    assert "backbone" not in core.__dict__ and result.summary["nothing_to_inpaint"]
    np.testing.assert_array_equal(result.pseudo_healthy, study.volume)


@pytest.mark.slow  # whole studies through every stage
def test_artifact_readers_check_the_marker_the_schema_and_the_grid(segmented, tmp_path):
    import shutil

    study = load_study(segmented / "study")
    with pytest.raises(InputError, match="not an attention artifact .no attention.json"):
        attention_artifact.read(tmp_path, study.geometry)
    copy = tmp_path / "attention"
    shutil.copytree(segmented / "attention", copy)
    summary = json.loads((copy / "attention.json").read_text())
    (copy / "attention.json").write_text(json.dumps({**summary, "schema_version": 99}))
    with pytest.raises(InputError, match="schema_version 99 is newer"):
        attention_artifact.read(copy, study.geometry)
    del summary["targets"][0]["mask"]
    (copy / "attention.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="attention target without a map or mask"):
        attention_artifact.read(copy, study.geometry)
    assert attention_artifact.read(copy, study.geometry, masks=False).threshold(0) > 0  # what refinement reads
    # An image off the study grid is bad input naming the file.
    summary = json.loads((segmented / "attention" / "attention.json").read_text())
    (copy / "attention.json").write_text(json.dumps(summary))
    mask = copy / summary["targets"][0]["mask"]
    image = sitk.ReadImage(str(mask))
    image.SetOrigin([o + 5.0 for o in image.GetOrigin()])
    sitk.WriteImage(image, str(mask))
    with pytest.raises(InputError, match="geometry .* differs from the study grid") as err:
        attention_artifact.read(copy, study.geometry)
    assert str(mask) in str(err.value)
    # Version 1 artifacts carry no schema_version field: every writer so far made them.
    assert "schema_version" not in summary and attention_artifact.SCHEMA_VERSION == 1


def test_the_core_segments_an_image_held_in_memory(model, case):
    """TotalSegmentator-style: an image in, per prompt a mask on its grid out, no folders."""
    from diffugts.artifacts.study import Study
    from diffugts.core import Core

    meta = json.loads((case / "case.json").read_text())
    image = sitk.ReadImage(str(case / meta["files"]["volume"]))
    result = Core(str(model.root), "cpu").run(Study.from_image(image, "CT"), PROMPTS)
    assert [t["prompt"]["text"] for t in result.lesions.targets] == PROMPTS
    assert all(m.shape == image.GetSize()[::-1] and m.dtype == bool for m in result.lesions.masks)
    assert result.synthesis.pseudo_healthy.shape == image.GetSize()[::-1]
    with pytest.raises(Exception, match="modality must be CT or MR"):
        Study.from_image(image, "PET")


@pytest.mark.slow  # whole studies through every stage
def test_segment_reuses_a_loaded_core_across_studies(model, case, tmp_path, monkeypatch):
    import diffugts.core as core_module
    from diffugts.runners.segment import segment

    core = core_module.Core(str(model.root), "cpu").load()
    opened = []
    monkeypatch.setattr(core_module, "open_package", lambda *a, **k: opened.append(a))
    for n in range(2):
        result = segment(
            str(case / "dicom"), tmp_path / f"seg{n}", PROMPTS, core=core, report=False, show_progress=False
        )
        assert (tmp_path / f"seg{n}" / "lesions" / "lesions.json").is_file() and "lesions" in result
    assert opened == []  # the package was opened once, before either study


@pytest.mark.slow  # whole studies through every stage
def test_refinement_reuses_the_attention_stages_encoding_of_the_study(model, case, monkeypatch):
    """With one window over the whole volume, E(x) is computed once (attention) and refinement
    encodes only the pseudo-healthy image; the refined maps are those of a fresh encoding."""
    from diffugts.artifacts.study import Study
    from diffugts.core import Core

    monkeypatch.setattr("diffugts.stages.attend.default_threshold", lambda *a, **k: 0.0)  # a region everywhere
    meta = json.loads((case / "case.json").read_text())
    study = Study.from_image(sitk.ReadImage(str(case / meta["files"]["volume"])), "CT")
    core = Core(str(model.root), "cpu")
    calls = []
    encode = core.backbone.encoder_features
    monkeypatch.setattr(core.backbone, "encoder_features", lambda x: calls.append(1) or encode(x))
    prepared = core.prepare(study)
    attention = core.attend(prepared, PROMPTS)
    assert attention.coarse.encoder_levels is not None
    synthesis = core.synthesize(prepared, attention)
    reused = core.refine(prepared, attention, synthesis)
    assert len(calls) == 1 and attention.coarse.encoder_levels is None  # E(H) only; the levels consumed
    fresh = core.refine(prepared, attention, synthesis)  # nothing kept now: E(x) computed again
    assert len(calls) == 3
    assert reused.summary == fresh.summary  # the lesions' confidences come from the refined maps
    for a, b in zip(reused.masks, fresh.masks):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(reused.instances, fresh.instances)
