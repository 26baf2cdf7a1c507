"""Bad datasets and mappings: one line naming the file and the reason; via the CLI exit code
2, no traceback, no result that looks complete."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

import datasetfactory as F
from diffugts.cli import main
from diffugts.datasets import open_dataset
from diffugts.datasets.mapping import load_mapping
from diffugts.errors import InputError
from modelfactory import random_package


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    cases = F.make_cases(range(3))[:2]
    return {
        "root": root,
        "cases": cases,
        "mapping": F.write_mapping(root / "mapping.json"),
        "msd": F.write_msd(root / "msd", cases),
        "nnunet": F.write_nnunet(root / "nnunet", cases),
        "kits": F.write_kits(root / "kits", cases),
    }


def _copy(world, name, tmp_path):
    return shutil.copytree(world[name], tmp_path / name)


def _error(fn) -> str:
    with pytest.raises(InputError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_dataset_json_naming_a_missing_image(world, tmp_path):
    root = _copy(world, "msd", tmp_path)
    first = sorted((root / "imagesTr").iterdir())[0]
    first.unlink()
    message = _error(lambda: open_dataset(root, world["mapping"]))
    assert message.startswith(str(root / "dataset.json")) and f"{first.name}, which does not exist" in message


def test_missing_label_files_in_each_layout(world, tmp_path):
    msd = _copy(world, "msd", tmp_path)
    next((msd / "labelsTr").iterdir()).unlink()
    assert "missing label file" in _error(lambda: open_dataset(msd, world["mapping"]))
    nnunet = _copy(world, "nnunet", tmp_path)
    label = sorted((nnunet / "labelsTr").iterdir())[1]
    label.unlink()
    message = _error(lambda: open_dataset(nnunet, world["mapping"]))
    assert message.startswith(str(label)) and "missing label file" in message
    kits = _copy(world, "kits", tmp_path)
    (kits / "case_00001" / "segmentation.nii.gz").unlink()
    message = _error(lambda: open_dataset(kits, world["mapping"]))
    assert message.startswith(str(kits / "case_00001" / "segmentation.nii.gz"))


def test_a_dicom_case_without_a_seg(world, tmp_path):
    root = F.write_dicom_seg(tmp_path / "dicom", world["cases"][:1])
    shutil.copytree(root / world["cases"][0].spec.case_id, root / "second")
    (root / "second" / "seg.dcm").unlink()
    d = open_dataset(root, world["mapping"])
    message = _error(lambda: d.load("second"))
    assert message.startswith(str(root / "second")) and "no DICOM SEG" in message


def test_a_label_value_not_in_the_mapping(world, tmp_path):
    doc = F.mapping_doc()
    value = str(F.ORGAN_VALUES["liver"])
    del doc["labels"][value]
    mapping = tmp_path / "short.json"
    mapping.write_text(json.dumps(doc))
    d = open_dataset(world["msd"], mapping)
    message = _error(lambda: d.load(d.case_ids[0]))
    assert message.startswith(str(world["msd"] / "labelsTr" / f"{d.case_ids[0]}.nii.gz"))
    assert f"label value {value} is not in the mapping {mapping}" in message


def test_image_and_label_grids_that_disagree(world, tmp_path):
    root = _copy(world, "kits", tmp_path)
    label = root / "case_00000" / "segmentation.nii.gz"
    img = sitk.ReadImage(str(label))
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(label))
    message = _error(lambda: open_dataset(root, world["mapping"]).load("case_00000"))
    assert message.startswith(str(label)) and "image and label grids disagree" in message
    smaller = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.uint8))
    sitk.WriteImage(smaller, str(label))
    assert "grids disagree" in _error(lambda: open_dataset(root, world["mapping"]).load("case_00000"))


@pytest.mark.parametrize(
    "doc, reason",
    [
        ("{not json", "not valid JSON"),
        ({"name": "x"}, 'needs a "labels" object'),
        ({"labels": {"1": {"lesion": "tumor"}}}, 'needs "organ"'),
        ({"labels": {"1": "organ"}}, "expected"),
        ({"modality": "PET", "labels": {"1": {"organ": "liver"}}}, '"modality" must be one of'),
        ({"labels": {"0": {"organ": "liver"}}}, "label 0 is the background"),
        ({"labels": {"1": {"organ": "liver", "colour": "red"}}}, "unknown field(s) colour"),
    ],
)
def test_bad_mapping_files(tmp_path, doc, reason):
    path = tmp_path / "m.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    message = _error(lambda: load_mapping(path))
    assert message.startswith(str(path)) and reason in message
    assert "not a shipped mapping" in _error(lambda: load_mapping("no-such-task"))


def test_not_a_dataset(tmp_path, world):
    (tmp_path / "empty").mkdir()
    assert "not a dataset in a known layout" in _error(lambda: open_dataset(tmp_path / "empty", world["mapping"]))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text("[1, 2]")
    assert _error(lambda: open_dataset(tmp_path / "bad", world["mapping"])).endswith("expected a JSON object")


def test_the_cli_says_one_line_exits_2_and_writes_no_result(world, tmp_path, capsys):
    model = random_package(tmp_path / "model")
    doc = F.mapping_doc()
    del doc["labels"][str(F.ORGAN_VALUES["liver"])]
    mapping = tmp_path / "short.json"
    mapping.write_text(json.dumps(doc))
    out = tmp_path / "out"
    rc = main(
        [
            "-q",
            "evaluate",
            "--dataset",
            str(world["msd"]),
            "--mapping",
            str(mapping),
            "--model",
            str(model.root),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("diffugts: error: ") and "\n" not in err and "Traceback" not in err
    assert "is not in the mapping" in err
    assert not (out / "evaluation.json").exists() and not (out / "evaluation.md").exists()
    rc = main(
        [
            "-q",
            "train",
            "aova",
            "--model",
            str(model.root),
            "--out",
            str(tmp_path / "pkg"),
            "--cases",
            "0",
            "--dataset",
            str(tmp_path / "nowhere"),
            "--mapping",
            "kits23",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"diffugts: error: {tmp_path / 'nowhere'}: dataset: not a folder"
    assert not (tmp_path / "pkg" / "manifest.json").exists()
    rc = main(
        [
            "-q",
            "train",
            "refine",
            "--model",
            str(model.root),
            "--dataset",
            str(world["msd"]),
            "--dataset",
            str(world["kits"]),
            "--mapping",
            "kits23",
            "--mapping",
            "kits23",
            "--mapping",
            "x",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "2 --dataset but 3 --mapping" in err


def test_an_unreadable_seg_names_itself_without_uids(world, tmp_path):
    root = F.write_dicom_seg(tmp_path / "dicom", world["cases"][:1])
    folder = root / world["cases"][0].spec.case_id
    import pydicom

    ds = pydicom.dcmread(folder / "seg.dcm")
    del ds.SegmentSequence  # a SEG without segment descriptions
    seg = folder / f"{ds.SOPInstanceUID}.dcm"  # named as PACS exports name it
    (folder / "seg.dcm").unlink()
    ds.save_as(seg)
    d = open_dataset(root, world["mapping"])
    message = _error(lambda: d.load(d.case_ids[0]))
    assert message.startswith(f"{folder}/<UID>.dcm: cannot read the DICOM SEG")
    assert not __import__("re").search(r"\d+\.\d+\.\d+\.\d+", message)


def test_seg_error_messages_lose_their_uids():
    from diffugts.datasets.dicomseg import without_uids

    text = "Referenced SOP Instance UID 1.2.826.0.1.3680043.8.498.123\n not found in series 2.25.1234.5"
    assert without_uids(text) == "Referenced SOP Instance UID <UID> not found in series <UID>"


def test_no_training_case_of_seen_types_is_an_error(world):
    from diffugts.datasets.training import DatasetSource
    from diffugts.models.configs import get_config
    from diffugts.stages.preprocess import Preprocessing

    prep = Preprocessing.from_dict(get_config("demo")["preprocessing"])
    source = DatasetSource(
        [open_dataset(world["msd"], world["mapping"], seen_types=["no-such-type"])], show_progress=False
    )
    message = _error(lambda: list(source.training_cases(prep)))
    assert message.startswith(str(world["msd"])) and "has only seen lesion types" in message
    assert source.provenance()["datasets"][0]["skipped_unseen"]
