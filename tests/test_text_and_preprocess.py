"""Text encoder (the real pretrained MiniLM shipped in a pip package), prompt templates,
and the study <-> model grid transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffugts.errors import ConfigError
from diffugts.geometry import Geometry
from diffugts.preprocess import Preprocessing, model_grid, normalise, to_model
from diffugts.text import TextEncoder, make_target, organ_of


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


def geometry(shape=(20, 30, 40), spacing=(1.0, 1.5, 2.0), direction=np.eye(3), origin=(5.0, -3.0, 10.0)):
    return Geometry(origin, spacing, direction, shape)


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
    blob = (((kk - 20) ** 2 + (jj - 30) ** 2 + (ii - 34) ** 2) < 10 ** 2).astype(np.float32)
    prep = Preprocessing((2.0, 2.0, 2.0), orientation="RAS", multiple=16)
    space = to_model(blob * 1000, g, "CT", prep)[1]
    back = space.to_study(space.to_model(blob)) > 0.5
    dice = 2 * (back & (blob > 0)).sum() / (back.sum() + blob.sum())
    assert dice > 0.95


def test_mr_normalisation_uses_percentiles():
    v = np.linspace(0, 1000, 1001, dtype=np.float32)
    out = normalise(v, "MR", Preprocessing((1, 1, 1), mr_percentiles=(0.0, 99.5)))
    assert out.min() == 0 and out[995] == pytest.approx(1.0, abs=1e-3) and out.max() > 1.0
