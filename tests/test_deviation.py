"""Organ-relative deviation, the coarse-map fusion and its fit, intensity randomisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from diffugts.stages import deviation
from diffugts.stages.deviation import (
    DeviationParams,
    Fusion,
    deviation_z,
    organ_box,
    organ_deviation,
    organ_interior,
    organ_with_inclusions,
)
from diffugts.train.data import TrainingCase
from diffugts.train.fusion import fit_fusion
from diffugts.train.randomise import randomise

SPACING = (4.0, 2.75, 2.75)  # (k, j, i) mm, the demo model grid


def _organ_with_lesion(rng, contrast=0.15):
    """A 24 x 48 x 48 volume: an ellipsoidal organ (0.5) in fat (0.2) with noise, and a
    spherical lesion of ``contrast`` inside it."""
    k, j, i = np.indices((24, 48, 48))
    organ = ((k - 12) / 9.0) ** 2 + ((j - 24) / 18.0) ** 2 + ((i - 24) / 18.0) ** 2 <= 1
    lesion = ((k - 12) / 2.5) ** 2 + ((j - 22) / 4.0) ** 2 + ((i - 28) / 4.0) ** 2 <= 1
    x = np.where(organ, 0.5, 0.2).astype(np.float32) + np.where(lesion, contrast, 0).astype(np.float32)
    x += rng.normal(0, 0.03, x.shape).astype(np.float32)
    return x, organ, lesion


def test_organ_with_inclusions_fills_lesion_holes_and_edge_notches():
    _, organ, lesion = _organ_with_lesion(np.random.default_rng(0))
    k, j, i = np.indices(organ.shape)
    notch = ((k - 12) / 2.0) ** 2 + ((j - 24) / 2.0) ** 2 + ((i - 41) / 2.0) ** 2 <= 1  # a small bite at the edge
    region = organ & ~lesion & ~notch  # what a region map sees: the lesions look unlike the organ
    region[0, 0, 0] = True  # a stray fragment far away
    filled = organ_with_inclusions(region, SPACING, DeviationParams(close_mm=10.0))
    assert filled[lesion].all(), "a lesion inside the organ is part of it"
    inner = notch & ndimage.binary_erosion(organ)  # the bite, less the organ's own surface voxels
    assert filled[inner].mean() > 0.8, "a lesion at the organ's edge narrower than the closing is pulled in"
    assert not filled[0, 0, 0], "small fragments are dropped"
    assert (filled & ~organ).sum() < 0.05 * organ.sum(), "closing does not grow the organ much"
    assert not organ_with_inclusions(np.zeros((4, 4, 4), bool), SPACING).any()


@pytest.mark.parametrize("contrast", [0.15, -0.15])
def test_deviation_z_marks_the_lesion_of_either_sign_and_nothing_outside(contrast):
    x, organ, lesion = _organ_with_lesion(np.random.default_rng(1), contrast)
    z = deviation_z(x, organ, SPACING)
    assert np.sign(np.median(z[lesion])) == np.sign(contrast)
    assert np.median(np.abs(z[lesion])) > 4 * np.median(np.abs(z[organ & ~lesion]))
    assert not z[~organ].any()
    # Scale-free: the same image in other units gives the same z (MR has no fixed scale).
    assert np.allclose(
        deviation_z(3 * x + 7, organ, SPACING, DeviationParams(floor=0.0)),
        deviation_z(x, organ, SPACING, DeviationParams(floor=0.0)),
        atol=1e-3,
    )


def test_fusion_maps_stay_in_the_organ_and_rank_the_lesion_first():
    x, organ, lesion = _organ_with_lesion(np.random.default_rng(2))
    region_lo = np.where(organ & ~lesion, 3.0, -3.0).astype(np.float32)
    anomaly_lo = np.zeros(x.shape, np.float32)
    maps = Fusion(anomaly_weight=1.0, deviation_weight=1.5, bias=-6.0).maps(x, region_lo, anomaly_lo, SPACING)
    assert maps.organ[lesion].all()
    assert not maps.prob[~maps.organ].any()
    assert maps.prob[lesion].mean() > 0.5 > maps.prob[organ & ~lesion].mean()
    again = Fusion.from_dict(Fusion(1.0, 1.5, -6.0).as_dict())
    assert again == Fusion(1.0, 1.5, -6.0)


def test_organ_interior_leaves_out_the_border_but_not_the_volume_edge_or_a_thin_organ():
    _, organ, _ = _organ_with_lesion(np.random.default_rng(6))
    assert (organ_interior(organ, SPACING) == organ).all(), "margin 0 (old packages): the whole organ"
    inner = organ_interior(organ, SPACING, DeviationParams(margin_mm=5.0))
    assert inner.any() and not (inner & ~organ).any()
    depth = ndimage.distance_transform_edt(np.pad(organ, 1), sampling=SPACING)[1:-1, 1:-1, 1:-1]
    assert depth[inner].min() >= 4.0 and depth[organ & ~inner].max() <= 8.5
    cut = organ.copy()
    cut[:12] = False  # the organ runs off the volume at slice 12... as if the scan began there
    half = organ_interior(cut[12:], SPACING, DeviationParams(margin_mm=5.0))
    assert half[0].sum() > 0.5 * inner[12].sum(), "the volume's edge is not the organ's surface"
    thin = np.zeros_like(organ)
    thin[12, 20:24, 20:24] = True  # one slice thick: no interior, so the organ keeps its voxels
    assert (organ_interior(thin, SPACING, DeviationParams(margin_mm=5.0)) == thin).all()


def test_a_border_margin_ignores_the_tissue_a_too_large_organ_map_takes_in():
    """An organ map one ring too large takes in fat, which deviates like a lesion; with the
    margin only the lesion deviates, in the deviation and in the fused map."""
    x, organ, lesion = _organ_with_lesion(np.random.default_rng(7))
    grown = ndimage.binary_dilation(organ, iterations=1)
    fat = grown & ~organ
    plain, margin = DeviationParams(), DeviationParams(margin_mm=5.0)
    assert np.abs(deviation_z(x, grown, SPACING, plain)[fat]).max() > 4, "without it the fat ring stands out"
    z = deviation_z(x, grown, SPACING, margin)
    assert not z[fat].any() and np.median(np.abs(z[lesion])) > 4
    assert np.abs(z[organ & ~lesion & ~ndimage.binary_dilation(lesion, iterations=2)]).max() < 3
    region_lo = np.where(grown & ~lesion, 3.0, -3.0).astype(np.float32)
    maps = Fusion(0.0, 1.5, -6.0, margin).maps(x, region_lo, np.zeros(x.shape, np.float32), SPACING)
    assert not maps.prob[fat].any() and maps.organ[fat].all(), "the organ keeps its border; the map does not"
    assert maps.prob[lesion].mean() > 0.5
    assert Fusion.from_dict(Fusion(0.0, 1.5, -6.0, margin).as_dict()).deviation.margin_mm == 5.0
    assert Fusion.from_dict({"anomaly_weight": 0, "deviation_weight": 1, "bias": 0}).deviation.margin_mm == 0.0


def _in_larger_volume(rng, x, organ, pad=((6, 10), (30, 4), (25, 0))):
    """The organ volume inside a larger one of noisy fat (touching its last i edge)."""
    big = np.pad(x, pad, constant_values=0.2) + rng.normal(0, 0.03, np.add(x.shape, np.sum(pad, 1))).astype(np.float32)
    big[tuple(slice(a, a + n) for (a, _), n in zip(pad, x.shape))] = x
    return big, np.pad(organ, pad)


def test_the_organs_box_gives_the_whole_volumes_numbers_bit_for_bit(monkeypatch):
    """organ_box only saves time: the organ, its interior and its z are the same as when every
    filter runs over the whole volume (organ_box replaced by the full extent)."""
    rng = np.random.default_rng(8)
    x, organ, lesion = _organ_with_lesion(rng)
    big, region = _in_larger_volume(rng, x, organ & ~np.pad(lesion, 0))
    box = organ_box(region, SPACING, 10.0)
    assert all(s.stop - s.start < n for s, n in zip(box, region.shape)), "the box is smaller than the volume"
    assert box[2].stop == region.shape[2], "it ends at the volume's edge where the organ touches it"
    region_lo = np.where(region, 3.0, -3.0).astype(np.float32)
    params = [DeviationParams(), DeviationParams(margin_mm=5.0, sigma_mm=4.0)]
    boxed = [organ_deviation(big, region_lo, SPACING, p) for p in params]
    monkeypatch.setattr(deviation, "organ_box", lambda mask, spacing, reach: tuple(slice(0, n) for n in mask.shape))
    for p, got in zip(params, boxed):
        for a, b in zip(got, organ_deviation(big, region_lo, SPACING, p)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert boxed[0][0][np.pad(lesion, ((6, 10), (30, 4), (25, 0)))].all()


def test_fit_fusion_weighs_the_informative_input_and_keeps_the_recall():
    rng = np.random.default_rng(3)
    n_pos, n_neg = 400, 4000
    labels = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(np.float32)
    z = np.r_[rng.normal(4, 1, n_pos), np.abs(rng.normal(0, 1, n_neg))]
    anomaly = rng.normal(0, 1, n_pos + n_neg)  # uninformative
    fusion, threshold = fit_fusion(np.stack([anomaly, z], 1).astype(np.float32), labels, DeviationParams(), recall=0.9)
    assert fusion.deviation_weight > 1.0 and abs(fusion.anomaly_weight) < 0.3 * fusion.deviation_weight
    logit = fusion.anomaly_weight * anomaly + fusion.deviation_weight * z + fusion.bias
    prob = 1 / (1 + np.exp(-logit))
    assert (prob[:n_pos] >= threshold).mean() == pytest.approx(0.9, abs=0.02)


def test_randomise_changes_tissue_intensities_but_keeps_labels_and_lesion_contrast():
    x, organ, lesion = _organ_with_lesion(np.random.default_rng(4))
    labels = organ.astype(np.uint8) + 1
    labels[:, :2] = 0  # some air
    case = TrainingCase("c", "CT", x, labels, lesion.astype(np.uint16), [], {1: "fat", 2: "liver"})
    rng = np.random.default_rng(5)
    copies = [randomise(case, rng, SPACING) for _ in range(6)]
    organ_means = [float(np.median(c.x[organ & ~lesion])) for c in copies]
    assert np.ptp(organ_means) > 0.2, "each copy puts the organ at another grey level"
    for c in copies:
        assert c.x.dtype == np.float32 and 0 <= c.x.min() and c.x.max() <= 1
        assert (c.organs == labels).all() and (c.lesions == case.lesions).all()
        # The lesion still departs from its organ (either sign): its deviation survives.
        z = deviation_z(c.x, organ, SPACING)
        assert np.median(np.abs(z[lesion])) > 2 * np.median(np.abs(z[organ & ~lesion]))


def test_a_thin_organ_keeps_at_least_its_share_of_interior():
    """``min_share``: a fixed 5 mm margin leaves a slab four voxels thick in-plane almost no
    interior; halving the margin (down to one voxel) leaves it half. A thick organ, where the
    margin leaves more than the share, is eroded as before, and 0 is the fixed margin."""
    _, thick, _ = _organ_with_lesion(np.random.default_rng(6))
    margin = DeviationParams(margin_mm=5.0)
    assert (organ_interior(thick, SPACING, margin, min_share=0.5) == organ_interior(thick, SPACING, margin)).all()
    slab = np.zeros((24, 48, 48), bool)
    slab[4:20, 20:26, 8:40] = True  # 6 voxels (16.5 mm) across in j, like a pancreas
    fixed = organ_interior(slab, SPACING, margin)
    share = organ_interior(slab, SPACING, margin, min_share=0.5)
    assert fixed.sum() < 0.5 * slab.sum() <= share.sum() and not (fixed & ~share).any()
    assert not (share & ~slab).any()
    # one voxel in: the slab's surface voxels are left out, in k, j and i
    assert share.sum() == (slab[5:19, 21:25, 9:39]).sum()
    # a share no margin reaches stops at one voxel rather than score the organ's surface
    assert (organ_interior(slab, SPACING, margin, min_share=0.99) == share).all()
