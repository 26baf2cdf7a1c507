"""Every layout reads the same cases the same way; mappings, organ sources, the split rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import datasetfactory as F
from diffugts.datasets import open_dataset
from diffugts.datasets.mapping import load_mapping, shipped_mappings
from diffugts.datasets.protocol import load_protocol, paper_figures, split_cases
from diffugts.errors import InputError
from diffugts.phantom.labels import ORGAN_BY_NAME


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    cases = F.make_cases(range(4), split="any")[:2]
    seg_mapping = root / "seg-mapping.json"
    seg_mapping.write_text(json.dumps(F.seg_mapping_doc()))
    return {
        "root": root,
        "cases": cases,
        "mapping": F.write_mapping(root / "mapping.json"),
        "seg_mapping": seg_mapping,
        "msd": F.write_msd(root / "msd", cases),
        "nnunet": F.write_nnunet(root / "nnunet", cases),
        "kits": F.write_kits(root / "kits", cases),
        "dicom": F.write_dicom_seg(root / "dicom", cases),
    }


def _summary(case):
    return (case.modality, sorted((r["type"], r["organ"], r["split"], r["voxels"]) for r in case.records))


def test_each_layout_gives_the_same_cases(world):
    ref = open_dataset(world["msd"], world["mapping"], seen_types=F.SEEN_TYPES)
    assert ref.layout == "msd" and len(ref) == 2
    others = {
        "nnunet": open_dataset(world["nnunet"], world["mapping"], seen_types=F.SEEN_TYPES),
        "kits": open_dataset(world["kits"], world["mapping"], seen_types=F.SEEN_TYPES),
        "dicom-seg": open_dataset(world["dicom"], world["seg_mapping"], seen_types=F.SEEN_TYPES),
    }
    assert {k: d.layout for k, d in others.items()} == {k: k for k in others}
    assert others["kits"].case_ids == ["case_00000", "case_00001"]
    for phantom, msd_id, n in zip(world["cases"], ref.case_ids, range(2)):
        a = ref.load(msd_id)
        assert msd_id == phantom.spec.case_id
        # The phantom's own truth: its lesions, their types and splits, its organs.
        assert np.array_equal(a.lesions > 0, phantom.lesion_map > 0)
        assert _summary(a)[1] == sorted(
            (
                r["type"],
                F.ORGAN_BY_NAME[r["organ"]].family if r["organ"].endswith("kidney") else r["organ"],
                r["split"],
                r["voxels"],
            )
            for r in phantom.lesions
        )
        liver = [k for k, v in a.organ_names.items() if v == "liver"][0]
        assert np.array_equal(
            a.organs == liver,
            (phantom.organs == ORGAN_BY_NAME["liver"].label)
            | np.isin(a.lesions, [r["id"] for r in a.records if r["organ"] == "liver"]),
        )
        for name, d in others.items():
            b = d.load(d.case_ids[n])
            assert np.array_equal(a.volume, b.volume), name
            assert np.allclose(a.geometry.affine, b.geometry.affine), name
            assert np.array_equal(a.lesions, b.lesions) and np.array_equal(a.organs, b.organs), name
            assert _summary(a) == _summary(b), name


def test_dicom_seg_segments_map_by_number_too(world):
    # Segment numbers are positions among the label values present; a mapping keyed by number.
    case = world["cases"][0]
    values = [int(v) for v in np.unique(F.label_map(case)) if v]
    doc = F.mapping_doc()
    doc["labels"] = {str(n): doc["labels"][str(v)] for n, v in enumerate(values, start=1)}
    path = world["root"] / "by-number.json"
    path.write_text(json.dumps(doc))
    d = open_dataset(world["dicom"], path, seen_types=F.SEEN_TYPES)
    ref = open_dataset(world["msd"], world["mapping"], seen_types=F.SEEN_TYPES).load(case.spec.case_id)
    got = d.load(case.spec.case_id)
    assert np.array_equal(got.lesions, ref.lesions) and _summary(got) == _summary(ref)


def test_dicom_seg_with_overlapping_segments_reads_as_the_disjoint_one(world, tmp_path):
    # Organ segments that hold their tumours: the smaller segment (the lesion) wins.
    cases = world["cases"][:1]
    F.write_dicom_seg(tmp_path / "overlap", cases, overlap=True)
    import highdicom as hd

    seg = hd.seg.segread(next((tmp_path / "overlap").glob("*/seg.dcm")))
    with pytest.raises(RuntimeError):  # the overlap is real: highdicom refuses to combine it
        seg.get_volume(combine_segments=True)
    got = open_dataset(tmp_path / "overlap", world["seg_mapping"], seen_types=F.SEEN_TYPES).load(cases[0].spec.case_id)
    ref = open_dataset(world["msd"], world["mapping"], seen_types=F.SEEN_TYPES).load(cases[0].spec.case_id)
    assert np.array_equal(got.lesions, ref.lesions) and np.array_equal(got.organs, ref.organs)
    assert _summary(got) == _summary(ref)


def test_cases_are_read_lazily_and_one_bad_file_names_itself(world, tmp_path):
    F.write_msd(tmp_path / "msd", world["cases"])
    bad = tmp_path / "msd" / "imagesTr" / f"{world['cases'][1].spec.case_id}.nii.gz"
    bad.write_bytes(b"not a nifti")
    d = open_dataset(tmp_path / "msd", world["mapping"])  # opening reads no image
    assert d.load(d.case_ids[0]).records is not None
    with pytest.raises(InputError) as err:
        d.load(d.case_ids[1])
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("multilabel", [False, True])
def test_totalsegmentator_organs_fill_a_tumour_only_dataset(world, tmp_path, multilabel):
    """MSD lung / colon / hepatic vessel label only the tumour: the organs come from
    TotalSegmentator's per-organ files or its multilabel file."""
    case = world["cases"][0]
    doc = {
        "name": "tumour-only",
        "modality": "CT",
        "labels": {k: v for k, v in F.mapping_doc()["labels"].items() if "lesion" in v},
    }
    doc["labels"].update({str(v): "ignore" for v in F.ORGAN_VALUES.values()})
    mapping = tmp_path / "tumour-only.json"
    mapping.write_text(json.dumps(doc))
    F.write_msd(tmp_path / "msd", [case])
    F.write_totalsegmentator(tmp_path / "ts", case.spec.case_id, case, multilabel=multilabel)
    got = open_dataset(tmp_path / "msd", mapping, organs=tmp_path / "ts").load(case.spec.case_id)
    names = {v: k for k, v in got.organ_names.items()}
    assert {"liver", "left kidney", "right kidney", "spleen", "pancreas", "lung"} <= set(names)
    lesion = got.lesions > 0
    for organ in ("liver", "spleen", "pancreas", "left kidney"):
        truth = case.organs == ORGAN_BY_NAME[organ].label
        assert np.array_equal((got.organs == names[organ]) & ~lesion, truth & ~lesion), organ
    lungs = np.isin(case.organs, [ORGAN_BY_NAME["right lung"].label, ORGAN_BY_NAME["left lung"].label])
    assert np.array_equal(got.organs == names["lung"], lungs & ~lesion)
    # Without the organ source the same case has lesions but no organ beyond their hosts.
    bare = open_dataset(tmp_path / "msd", mapping).load(case.spec.case_id)
    assert set(bare.organ_names.values()) == {r["organ"] for r in bare.records}


def test_lesions_are_connected_components_of_their_label(tmp_path):
    labels = np.zeros((8, 16, 16), np.uint8)
    labels[1:3, 1:4, 1:4] = 2
    labels[5:7, 10:14, 10:14] = 2
    labels[5:7, 1:3, 1:3] = 3
    image = sitk.GetImageFromArray(np.zeros(labels.shape, np.float32))
    (tmp_path / "case_00000").mkdir()
    sitk.WriteImage(image, str(tmp_path / "case_00000" / "imaging.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "case_00000" / "segmentation.nii.gz"))
    case = open_dataset(tmp_path, "kits23", seen_types=["kidney-tumor"]).load("case_00000")
    assert [(r["type"], r["voxels"], r["split"]) for r in case.records] == [
        ("kidney-tumor", 18, "seen"),
        ("kidney-tumor", 32, "seen"),
        ("kidney-cyst", 8, "unseen"),
    ]
    assert sorted(np.unique(case.lesions).tolist()) == [0, 1, 2, 3]
    assert case.records[2]["prompts"] == ["kidney cyst", "renal cyst"]


def test_shipped_mappings_say_the_public_label_meanings():
    assert shipped_mappings() == [
        "kits23",
        "msd-task03-liver",
        "msd-task06-lung",
        "msd-task07-pancreas",
        "msd-task08-hepaticvessel",
        "msd-task09-spleen",
        "msd-task10-colon",
    ]
    meaning = {
        name: {k: (m.kind, m.organ, m.lesion) for k, m in load_mapping(name).labels.items()}
        for name in shipped_mappings()
    }
    assert meaning["msd-task03-liver"] == {"1": ("organ", "liver", None), "2": ("lesion", "liver", "liver-tumor")}
    assert meaning["msd-task07-pancreas"]["2"] == ("lesion", "pancreas", "pancreas-tumor")
    assert meaning["msd-task08-hepaticvessel"] == {
        "1": ("ignore", None, None),
        "2": ("lesion", "liver", "hepatic-vessel-tumor"),
    }
    assert meaning["msd-task10-colon"] == {"1": ("lesion", "colon", "colon-cancer")}
    assert meaning["msd-task06-lung"] == {"1": ("lesion", "lung", "lung-cancer")}
    assert meaning["msd-task09-spleen"] == {"1": ("organ", "spleen", None)}
    assert meaning["kits23"] == {
        "1": ("organ", "kidney", None),
        "2": ("lesion", "kidney", "kidney-tumor"),
        "3": ("lesion", "kidney", "kidney-cyst"),
    }
    assert all(load_mapping(n).name == n for n in shipped_mappings())


def test_the_paper_protocol_file_is_consistent():
    protocol = load_protocol("paper-protocol")
    used = [i["mapping"] for i in protocol.train + protocol.evaluate]
    assert set(used) == set(shipped_mappings())
    trained_types = {t for i in protocol.train for t in load_mapping(i["mapping"]).lesion_types()}
    assert set(protocol.seen_types) == trained_types
    for item in protocol.evaluate:  # evaluation datasets hold unseen types only
        assert not set(load_mapping(item["mapping"]).lesion_types()) & set(protocol.seen_types)
    assert set(paper_figures()) <= set(used)


def test_the_held_out_split_depends_on_names_only(world):
    d = open_dataset(world["kits"], world["mapping"])
    train, held = split_cases(d, 0.2)
    assert train and held and sorted(train + held) == d.case_ids  # two cases: one of each at least
    again = split_cases(d.subset(list(reversed(d.case_ids))), 0.2)
    assert sorted(again[0]) == sorted(train) and sorted(again[1]) == sorted(held)


def test_a_case_cap_keeps_a_nested_hash_chosen_subset(world, tmp_path):
    from diffugts.datasets.training import DatasetSource

    cases = F.make_cases(range(10), split="seen")[:5]
    d = open_dataset(F.write_kits(tmp_path / "kits", cases), world["mapping"], seen_types=F.SEEN_TYPES)
    full = DatasetSource([d], 0.2, show_progress=False)
    picked = [DatasetSource([d], 0.2, show_progress=False, max_cases=n).train[0].case_ids for n in (1, 2, 3)]
    assert [len(p) for p in picked] == [1, 2, 3]
    assert set(picked[0]) < set(picked[1]) < set(picked[2]) <= set(full.train[0].case_ids)
    assert DatasetSource([d], 0.2, show_progress=False, max_cases=2).key()["max_cases"] == 2


def test_a_shipped_mapping_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "kits23").mkdir()  # e.g. the dataset itself, beside the command
    monkeypatch.chdir(tmp_path)
    assert load_mapping("kits23").name == "kits23"
    with pytest.raises(InputError, match="a folder, not a mapping file"):
        load_mapping("kits23/")


def test_a_relative_split_file_and_its_mappings_are_found_under_the_data_root(world, tmp_path, monkeypatch):
    from diffugts.datasets.protocol import open_protocol_datasets
    from diffugts.datasets.select import protocol_of

    root = tmp_path / "data"
    (root / "splits").mkdir(parents=True)
    (root / "maps").mkdir()
    (root / "maps" / "mine.json").write_text(world["mapping"].read_text())
    doc = {
        "name": "mine",
        "seen_types": list(F.SEEN_TYPES),
        "train": [{"path": str(world["msd"]), "mapping": "maps/mine.json"}],
    }
    (root / "splits" / "mine.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)  # the working directory is not the data root
    protocol = protocol_of("splits/mine.json", root)
    assert protocol.name == "mine" and protocol.path == str(root / "splits" / "mine.json")
    [d] = open_protocol_datasets(protocol, root, "train")
    assert d.case_ids == open_dataset(world["msd"], world["mapping"]).case_ids
    (tmp_path / "paper-protocol").mkdir()  # a folder named like a shipped split file
    assert load_protocol("paper-protocol").name == "paper-protocol"  # the name still means the shipped one
    with pytest.raises(InputError, match="a folder, not a split file"):
        load_protocol(tmp_path / "paper-protocol")
