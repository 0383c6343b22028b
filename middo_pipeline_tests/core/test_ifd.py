"""IFD on the tiny model: by hand, and in the direction the signal relies on."""

from __future__ import annotations

import numpy as np
import pytest

from middo_pipeline.core.diversity import TopComponents
from middo_pipeline.core.forward import score_samples
from middo_pipeline.core.ifd import ifd_scores, unconditional_loss
from middo_pipeline.core.neighbours import max_cosine_to, top_cosine_to


def test_ifd_ratio_and_missing():
    got = ifd_scores(np.array([1.0, 2.0, np.nan, 1.0, 1.0]), np.array([2.0, 1.0, 1.0, 0.0, np.nan]))
    np.testing.assert_allclose(got[:2], [0.5, 2.0])
    assert np.isnan(got[2:]).all()


def test_unconditional_loss_is_the_empty_prompt(tiny_model_dir):
    from middo_pipeline.models.loading import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    responses = ["Paris is the capital of France.", "Four.", None]
    u = unconditional_loss(lm.model, lm.tokenizer, responses)
    want = score_samples(lm.model, lm.tokenizer, ["", "", ""], responses, with_embeddings=False)
    np.testing.assert_allclose(u.loss, want.loss)
    assert u.embedding is None and np.isnan(u.loss[2])
    c = score_samples(lm.model, lm.tokenizer, ["Capital of France?", "2+2?", "x"], responses, with_embeddings=False)
    r = ifd_scores(c.loss, u.loss)
    assert np.isfinite(r[:2]).all() and (r[:2] > 0).all() and np.isnan(r[2])


def test_top_components_removed_and_reused():
    rng = np.random.default_rng(0)
    common = rng.normal(size=16) * 10
    x = rng.normal(size=(200, 16)) + common  # one dominant shared direction
    tc = TopComponents(1).fit(x)
    y = tc.transform(x)
    assert abs(float(np.mean(y @ tc.components[0]))) < 1e-6  # nothing left along the top direction
    # the same fitted transform applies to new rows
    z = tc.transform(x[:3] + 0.0)
    np.testing.assert_allclose(z, y[:3], atol=1e-5)
    assert TopComponents(0).fit(x).transform(x) is not None
    np.testing.assert_allclose(TopComponents(0).fit(x).transform(x), x.astype(np.float32))
    with pytest.raises(ValueError):
        TopComponents(-1)


def test_max_cosine_to():
    keys = np.array([[1.0, 0.0], [0.0, 1.0]])
    q = np.array([[1.0, 0.1], [-1.0, 0.0]])
    got = max_cosine_to(q, keys, block_size=1)
    np.testing.assert_allclose(got, [1 / np.sqrt(1.01), 0.0], atol=1e-6)
    assert np.isnan(max_cosine_to(q, keys[:0])).all()


def test_top_cosine_to_matches_a_full_sort():
    rng = np.random.default_rng(1)
    keys, q = rng.normal(size=(37, 5)), rng.normal(size=(4, 5))
    vals, idx = top_cosine_to(q, keys, m=6, block_size=8)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    full = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ kn.T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :6])
    np.testing.assert_allclose(vals, np.take_along_axis(full, idx, axis=1), atol=1e-6)
    np.testing.assert_allclose(vals[:, 0], max_cosine_to(q, keys), atol=1e-6)
    v, i = top_cosine_to(q, keys[:3], m=6)  # fewer keys than asked: all of them
    assert v.shape == i.shape == (4, 3)
    v, i = top_cosine_to(q, keys[:0], m=6)
    assert v.shape == (4, 0)
