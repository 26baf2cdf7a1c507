"""The phantom generator in memory: determinism, anatomy, tissue values, lesions, MR, split."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from diffugts.phantom.case import CaseSpec, allowed_combinations, generate_case, plan_lesions, streams
from diffugts.phantom.cohort import series_info
from diffugts.phantom.dicom import uids
from diffugts.phantom.labels import ORGAN_BY_NAME, ORGANS
from diffugts.phantom.lesions import LESION_TYPES, prompts
from diffugts.phantom.split import SEEN, SEEN_ORGANS, SEEN_TYPES, split_of, unseen_reasons

L = {o.name: o.label for o in ORGANS}


def _mean(case, organ, exclude_lesions=True):
    m = case.organs == L[organ]
    if exclude_lesions:
        m &= case.lesion_map == 0
    return float(case.image[m].mean())


def _centroid(case, organ):
    """Patient (LPS) centroid in mm of an organ."""
    idx = np.argwhere(case.organs == L[organ])
    return case.grid.to_patient(idx.mean(0))


@pytest.fixture(scope="module")
def healthy_ct():
    return [generate_case(CaseSpec(seed=5, index=i, healthy=True)) for i in range(3)]


@pytest.fixture(scope="module")
def lesion_cases():
    """One CT case per lesion type, in varied organs."""
    out = []
    for i, t in enumerate(LESION_TYPES):
        organs = LESION_TYPES[t].organs
        spec = CaseSpec(seed=21, index=i, lesion_types=(t,), organs=(organs[i % len(organs)],), healthy_fraction=0.0)
        out.append(generate_case(spec))
    return out


def test_same_seed_same_case_including_uids():
    spec = CaseSpec(seed=3, index=2, healthy_fraction=0.0)
    a, b = generate_case(spec), generate_case(spec)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.organs, b.organs)
    assert np.array_equal(a.lesion_map, b.lesion_map)
    assert a.lesions == b.lesions and a.lesions
    assert a.grid == b.grid
    assert uids(series_info(a)) == uids(series_info(b))


def test_different_seeds_different_patients():
    a = generate_case(CaseSpec(seed=3, index=0, healthy=True))
    b = generate_case(CaseSpec(seed=4, index=0, healthy=True))
    c = generate_case(CaseSpec(seed=3, index=1, healthy=True))
    for other in (b, c):
        assert not np.array_equal(a.organs, other.organs)
        assert a.anatomy["zR"] != other.anatomy["zR"]
        assert a.grid.origin != other.grid.origin
        assert uids(series_info(a))["series"] != uids(series_info(other))["series"]
    liver = [(x.organs == L["liver"]).sum() for x in (a, b, c)]
    assert len(set(liver)) == 3


def test_grid_defaults_and_types(healthy_ct):
    c = healthy_ct[0]
    assert c.image.shape == c.organs.shape == c.lesion_map.shape == (64, 128, 128)
    assert c.image.dtype == np.float32 and c.organs.dtype == np.uint8
    assert c.lesion_map.dtype == np.uint16
    assert c.grid.spacing == (2.75, 2.75, 4.0)
    assert np.array_equal(c.image, np.rint(c.image))  # integer HU, as stored in DICOM
    assert c.image.min() >= -1024 and c.image.max() <= 3071


@pytest.mark.parametrize(
    "organ,lo,hi",
    [
        ("subcutaneous fat", -125, -75),
        ("muscle", 35, 75),
        ("liver", 50, 115),
        ("spleen", 75, 145),
        ("right kidney", 95, 190),
        ("left kidney", 95, 190),
        ("pancreas", 60, 120),
        ("aorta", 130, 220),
        ("inferior vena cava", 100, 190),
        ("right lung", -900, -780),
        ("left lung", -900, -780),
        ("spine", 200, 1000),
        ("ribs", 200, 800),
        ("gallbladder", -10, 40),
        ("heart", 90, 220),
    ],
)
def test_ct_tissue_values(healthy_ct, organ, lo, hi):
    for c in healthy_ct:
        m = c.organs == L[organ]
        if m.sum() < 50:
            continue  # e.g. no gallbladder after cholecystectomy
        # median: small organs carry partial volume from their wall and neighbours
        assert lo <= np.median(c.image[m]) <= hi, (organ, np.median(c.image[m]))


def test_ct_background_bone_and_air(healthy_ct):
    for c in healthy_ct:
        assert c.image[c.organs == 0].mean() < -990  # air around the patient
        bone = c.image[c.organs == L["spine"]]
        assert np.percentile(bone, 99) > 400  # cortical bone


@pytest.mark.parametrize("seed", range(6))
def test_anatomy_positions(seed):
    c = generate_case(CaseSpec(seed=100 + seed, index=0, healthy=True))
    x0 = c.grid.offset[0]  # body-frame centre in patient x
    liver, spleen = _centroid(c, "liver"), _centroid(c, "spleen")
    assert liver[0] < x0 < spleen[0]  # liver on the patient's right (-x in LPS)
    rk, lk = _centroid(c, "right kidney"), _centroid(c, "left kidney")
    assert rk[0] < x0 < lk[0] and rk[2] < lk[2]  # the right kidney sits lower
    ao, ivc = _centroid(c, "aorta"), _centroid(c, "inferior vena cava")
    assert ivc[0] < ao[0]  # IVC right of the aorta
    k = 20  # an abdominal slice: aorta anterior-left of the vertebral body
    ao_s = np.argwhere(c.organs[k] == L["aorta"]).mean(0)
    spine = np.argwhere(c.organs[k] == L["spine"])
    assert ao_s[0] < spine[:, 0].min()  # row: in front of the vertebral body's front edge
    assert ao_s[1] > spine[:, 1].mean()  # column: towards the patient's left
    assert rk[1] > ao[1] and lk[1] > ao[1]  # kidneys posterior to the aorta
    assert _centroid(c, "right lung")[2] > liver[2] > rk[2]
    # in the image array the liver is in the left half of the columns (radiological view)
    cols = np.argwhere(c.organs == L["liver"])[:, 2]
    assert np.median(cols) < c.organs.shape[2] / 2


def test_organ_volumes_plausible(healthy_ct):
    ranges = {
        "liver": (700, 2600),
        "spleen": (60, 500),
        "right kidney": (70, 260),
        "left kidney": (70, 260),
        "pancreas": (30, 160),
        "heart": (0, 900),
    }
    for c in healthy_ct:
        for organ, (lo, hi) in ranges.items():
            ml = (c.organs == L[organ]).sum() * c.grid.voxel_ml
            assert lo <= ml <= hi, (organ, ml)
        present = set(np.unique(c.organs))
        for organ in (
            "liver",
            "spleen",
            "right kidney",
            "left kidney",
            "pancreas",
            "aorta",
            "spine",
            "bowel",
            "right lung",
            "left lung",
            "muscle",
            "subcutaneous fat",
        ):
            assert L[organ] in present, organ


def test_lesions_inside_their_organs_and_records_match(lesion_cases):
    for c in lesion_cases:
        assert c.lesions, c.spec
        ids = set(np.unique(c.lesion_map)) - {0}
        assert ids == {r["id"] for r in c.lesions}
        for r in c.lesions:
            m = c.lesion_map == r["id"]
            assert m.sum() == r["voxels"] >= 8
            assert np.all(c.organs[m] == r["organ_label"])
            assert ORGAN_BY_NAME[r["organ"]].label == r["organ_label"]
            assert r["type"] in LESION_TYPES and r["type"] in c.spec.lesion_types
            assert r["split"] == split_of("CT", r["organ"], r["type"])
            assert r["volume_ml"] == pytest.approx(m.sum() * c.grid.voxel_ml, abs=1e-3)
            cen = c.grid.to_patient(np.argwhere(m).mean(0))
            assert np.allclose(cen, r["centroid_mm"], atol=0.01)
            assert r["prompts"] and all(isinstance(p, str) and p for p in r["prompts"])


def test_lesions_are_visible_anomalies(lesion_cases):
    """Every lesion differs from the surrounding organ tissue by clearly more than noise."""
    for c in lesion_cases:
        for r in c.lesions:
            m = c.lesion_map == r["id"]
            ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m)
            ring &= (c.organs == r["organ_label"]) & (c.lesion_map == 0)
            if ring.sum() < 20:
                continue
            ref = np.median(c.image[ring])  # robust to sinus fat / vessels in the ring
            diff = c.image[m].mean() - ref
            # mean absolute deviation: rim + necrotic core would cancel in a plain mean
            assert np.abs(c.image[m] - ref).mean() >= 18, (r["type"], r["organ"], diff)
            if r["type"] == "rim_necrotic":
                core = ndimage.binary_erosion(m, iterations=2)
                assert c.image[core].mean() < ref - 20
            if r["type"] == "cystic":
                assert -15 <= c.image[m].mean() <= 35  # water density
                assert diff < 0
            if r["type"] in ("hypodense", "multifocal", "infiltrative"):
                assert diff < 0
            if r["type"] == "hyperenhancing":
                assert diff > 0


def test_sizes_vary_and_multifocal_has_several(lesion_cases):
    by_type = {c.spec.lesion_types[0]: c for c in lesion_cases}
    assert len(by_type["multifocal"].lesions) >= 2
    assert len({r["group"] for r in by_type["multifocal"].lesions}) == 1
    diam = [r["diameter_mm"] for c in lesion_cases for r in c.lesions]
    assert min(diam) < 15 and max(diam) > 25


def test_healthy_cases_and_their_healthy_twin():
    spec = CaseSpec(seed=9, index=1, lesion_types=("hypodense",), organs=("liver",), healthy_fraction=0.0)
    sick = generate_case(spec)
    well = generate_case(replace(spec, healthy=True))
    assert sick.lesions and not well.lesions
    assert not well.lesion_map.any()
    assert np.array_equal(sick.organs, well.organs)
    far = ~ndimage.binary_dilation(sick.lesion_map > 0, iterations=3)
    assert np.array_equal(sick.image[far], well.image[far])  # same patient, same noise
    assert not np.array_equal(sick.image, well.image)


def test_healthy_fraction_gives_some_healthy_cases():
    n_healthy = sum(not generate_case(CaseSpec(seed=2, index=i, healthy_fraction=0.5)).lesions for i in range(8))
    assert 1 <= n_healthy <= 7


def test_mr_contrasts_differ_as_designed():
    base = CaseSpec(
        seed=13,
        index=0,
        modality="MR",
        mr_contrast="T1",
        lesion_types=("cystic",),
        organs=("liver",),
        healthy_fraction=0.0,
    )
    t1, t2 = generate_case(base), generate_case(replace(base, mr_contrast="T2"))
    ct = generate_case(replace(base, modality="CT", mr_contrast=None))
    assert np.array_equal(t1.organs, t2.organs) and np.array_equal(t1.organs, ct.organs)
    assert np.array_equal(t1.lesion_map, ct.lesion_map) and t1.lesions
    for c in (t1, t2):
        assert c.image.min() >= 0 and c.image.max() <= 4095
        assert np.array_equal(c.image, np.rint(c.image))
        assert _mean(c, "subcutaneous fat") > 1.5 * _mean(c, "muscle")
    liver1, liver2 = _mean(t1, "liver"), _mean(t2, "liver")
    cyst1 = t1.image[t1.lesion_map > 0].mean()
    cyst2 = t2.image[t2.lesion_map > 0].mean()
    assert cyst1 < 0.6 * liver1  # water dark on T1
    assert cyst2 > 2.5 * liver2  # and bright on T2
    assert _mean(t2, "spleen") > _mean(t2, "liver")
    assert _mean(t1, "spleen") < _mean(t1, "liver")
    assert _mean(t1, "pancreas") > _mean(t1, "muscle")
    for organ in ("spine",):  # CSF in the canal is bright on T2 only
        assert t2.image[t2.organs == L[organ]].max() > t1.image[t1.organs == L[organ]].max()


def test_split_constants_and_reasons():
    assert {m for m, _, _ in SEEN} == {"CT"}
    assert set(SEEN_TYPES) < set(LESION_TYPES) and len(LESION_TYPES) >= 6
    assert "pancreas" not in SEEN_ORGANS and "liver" in SEEN_ORGANS
    assert split_of("CT", "liver", "hypodense") == "seen"
    assert unseen_reasons("CT", "liver", "rim_necrotic") == ["type"]
    assert unseen_reasons("CT", "pancreas", "hypodense") == ["organ"]
    assert unseen_reasons("MR", "liver", "hypodense") == ["modality"]
    assert split_of("MR", "liver", "hypodense") == "unseen"


@pytest.mark.parametrize("split", ["seen", "unseen"])
def test_plans_respect_the_split(split):
    spec = CaseSpec(seed=1, index=0, split=split, healthy_fraction=0.0)
    assert allowed_combinations(spec)
    for i in range(30):
        for t, o in plan_lesions(replace(spec, index=i), streams(1, i)["plan"]):
            assert split_of("CT", o, t) == split
    mr = replace(spec, modality="MR", mr_contrast="T1")
    assert (allowed_combinations(mr) == []) == (split == "seen")


def test_prompts_name_the_organ():
    assert "hepatocellular carcinoma" in prompts("hyperenhancing", "liver")
    assert "renal cell carcinoma" in prompts("hyperenhancing", "left kidney")
    assert "liver tumor" in prompts("hypodense", "liver")
    for t, lt in LESION_TYPES.items():
        assert lt.description and lt.diameter_mm[0] < lt.diameter_mm[1]
        for o in lt.organs:
            ps = prompts(t, o)
            assert len(ps) >= 2 and ORGAN_BY_NAME[o].family in ps[0]


def test_generation_is_fast():
    spec = CaseSpec(seed=0, index=0, healthy_fraction=0.0)
    generate_case(spec)
    t = time.perf_counter()
    generate_case(replace(spec, index=1))
    assert time.perf_counter() - t < 3.0  # ~0.3 s on one core; generous for busy CI
