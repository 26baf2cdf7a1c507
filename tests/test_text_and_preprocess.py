"""Text encoder (the real pretrained MiniLM shipped in a pip package), prompt templates,
and the study <-> model grid transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffugts.artifacts.geometry import Geometry
from diffugts.errors import ConfigError
from diffugts.networks.text import TextEncoder, make_target, organ_of
from diffugts.stages.preprocess import Preprocessing, model_grid, normalise, to_model


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


def test_real_pretrained_embeddings(encoder):
    e = encoder.embed(["liver tumor", "hepatic metastasis", "normal liver tissue", "kidney cyst"])
    assert e.shape == (4, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    sims = e @ e.T
    # A pretrained encoder puts the two liver tumour phrasings closer than tumour vs cyst of another organ.
    assert sims[0, 1] > sims[0, 3] + 0.1
    # Cached: the same text gives the identical tensor.
    assert torch.equal(encoder.embed(["liver tumor"])[0], e[0])


def test_organ_words():
    assert organ_of("Hepatocellular carcinoma of the liver") == "liver"
    assert organ_of("renal cell carcinoma") == "kidney"
    assert organ_of("pancreatic cyst") == "pancreas"
    assert organ_of("a strange blob") is None


def test_target_expansion():
    t = make_target("pancreatic cyst")
    assert t.organ == "pancreas"
    assert t.abnormal[0] == "pancreatic cyst"
    assert "pancreas tumor" in t.abnormal and "normal pancreas tissue" in t.normal
    assert "background" in t.normal
    free = make_target("weird bright thing")
    assert free.organ is None and free.abnormal[0] == "weird bright thing" and free.normal
    custom = make_target("x", normal=["n"], abnormal=["a", "a"])
    assert custom.normal == ["n"] and custom.abnormal == ["a"]
    with pytest.raises(ConfigError):
        make_target("   ")


def test_missing_text_encoder_folder(tmp_path):
    with pytest.raises(ConfigError, match="not a transformers model folder"):
        TextEncoder(tmp_path)


def geometry(shape=(20, 30, 40), spacing=(1.0, 1.5, 2.0), direction=None, origin=(5.0, -3.0, 10.0)):
    return Geometry(origin, spacing, np.eye(3) if direction is None else direction, shape)


def test_identity_grid_is_an_exact_copy():
    g = geometry(shape=(16, 32, 48), spacing=(2.75, 2.75, 4.0))
    vol = np.random.default_rng(0).normal(0, 300, g.shape).astype(np.float32)
    x, space = to_model(vol, g, "CT", Preprocessing((2.75, 2.75, 4.0), multiple=16))
    assert space.model.allclose(g)
    np.testing.assert_allclose(x, np.clip((vol + 1000) / 2000, 0, 1))
    np.testing.assert_allclose(space.to_study(x), x)


def test_model_grid_covers_the_study_padded_to_the_multiple():
    g = geometry(direction=np.diag([1.0, -1.0, 1.0]))
    prep = Preprocessing((3.0, 3.0, 3.0), orientation="RAS", multiple=16)
    m = model_grid(g, prep)
    assert all(n % 16 == 0 for n in m.shape)
    np.testing.assert_allclose(m.direction, np.diag([-1.0, -1.0, 1.0]))
    # Centres coincide: the padded grid is centred on the study.
    centre = lambda geo: geo.world(np.array(geo.shape[::-1]) / 2 - 0.5)  # noqa: E731
    np.testing.assert_allclose(centre(m), centre(g), atol=1e-6)


def test_round_trip_through_a_coarser_grid_keeps_a_blob():
    g = geometry(shape=(40, 64, 64), spacing=(1.0, 1.0, 1.0))
    kk, jj, ii = np.mgrid[:40, :64, :64]
    blob = (((kk - 20) ** 2 + (jj - 30) ** 2 + (ii - 34) ** 2) < 10**2).astype(np.float32)
    prep = Preprocessing((2.0, 2.0, 2.0), orientation="RAS", multiple=16)
    space = to_model(blob * 1000, g, "CT", prep)[1]
    back = space.to_study(space.to_model(blob)) > 0.5
    dice = 2 * (back & (blob > 0)).sum() / (back.sum() + blob.sum())
    assert dice > 0.95


def test_mr_normalisation_uses_percentiles():
    v = np.linspace(0, 1000, 1001, dtype=np.float32)
    out = normalise(v, "MR", Preprocessing((1, 1, 1), mr_percentiles=(0.0, 99.5)))
    assert out.min() == 0 and out[995] == pytest.approx(1.0, abs=1e-3) and out.max() > 1.0


def _oblique(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("case", ["oblique", "half-voxel ties"])
def test_torch_resampling_agrees_with_simpleitk(case):
    """The device path (torch) gives SimpleITK's results: linear to float precision, labels
    exactly, ITK's edge rule and fill value included (in both directions of a ModelSpace)."""
    from diffugts.stages.preprocess import resample_array, resample_torch

    rng = np.random.default_rng(3)
    if case == "oblique":  # tilted study, anisotropic spacing, model grid in RAS
        study = geometry(shape=(17, 29, 33), spacing=(0.9, 1.3, 2.5), direction=_oblique(17.0))
        prep = Preprocessing((1.7, 1.7, 2.0), orientation="RAS", multiple=8)
    else:  # 0.75 mm study on a 1.5 mm grid: model voxel centres fall exactly between study voxels
        study = geometry(shape=(16, 24, 24), spacing=(0.75, 0.75, 1.5))
        prep = Preprocessing((1.5, 1.5, 1.5), orientation="LPS", multiple=8)
    model = model_grid(study, prep)
    vol = rng.normal(40, 300, study.shape).astype(np.float32)
    labels = rng.integers(0, 4, study.shape).astype(np.float32)
    small = rng.random(model.shape).astype(np.float32)
    for arr, src, dst, outside in ((vol, study, model, True), (small, model, study, False)):
        ref = resample_array(arr, src, dst, fill=-7.0)
        got = resample_array(arr, src, dst, fill=-7.0, device="cpu")
        assert got.shape == ref.shape == dst.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3 * float(np.abs(arr).max()))
        # The same voxels lie outside (the padded model grid overhangs the study; not vice versa).
        np.testing.assert_array_equal(got == -7.0, ref == -7.0)
        assert (ref == -7.0).any() == outside
    ref = resample_array(labels, study, model, nearest=True)
    got = resample_torch(labels, study, model, nearest=True, device="cpu", slab=5)  # several slabs
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("device", [None, "cpu"])  # SimpleITK on the host, torch
def test_to_study_of_a_box_is_that_box_of_the_whole(device):
    """Synthesis and refinement resample only the box they paste into: the same values as
    the box of a whole-grid resampling, labels included, in an oblique study."""
    from diffugts.stages.preprocess import ModelSpace

    study = geometry(shape=(17, 29, 33), spacing=(0.9, 1.3, 2.5), direction=_oblique(17.0))
    space = ModelSpace(study, model_grid(study, Preprocessing((1.7, 1.7, 2.0), orientation="RAS", multiple=8)), device)
    rng = np.random.default_rng(5)
    values = rng.random(space.model.shape).astype(np.float32)
    labels = rng.integers(0, 3, space.model.shape).astype(np.float32)
    box = (slice(3, 11), slice(0, 20), slice(7, 33))
    sub = study.crop(box)
    np.testing.assert_allclose(sub.world([0, 0, 0]), study.world([7, 0, 3]))
    assert sub.shape == (8, 20, 26)
    np.testing.assert_allclose(space.to_study(values, box=box), space.to_study(values)[box], atol=1e-5)
    np.testing.assert_array_equal(
        space.to_study(labels, nearest=True, box=box), space.to_study(labels, nearest=True)[box]
    )
