import time

import numpy as np
import pytest
import torch

from middo_pipeline.core import diversity, neighbours
from middo_pipeline.core.diversity import (
    cluster_dynamics,
    default_n_clusters,
    kmeans_clusters,
    sparsity_scores,
    umap_2d,
)
from middo_pipeline.core.neighbours import topk_cosine


def _dense_topk(emb: np.ndarray, k: int):
    x = emb.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order, s


@pytest.fixture(scope="module")
def emb500():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 24)).astype(np.float32)
    emb[10] = emb[3]  # exact duplicates at different indices are real neighbours
    emb[11] = emb[3] * 2.5  # same direction, different norm: cosine 1
    emb[400] = emb[250]
    return emb


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("block_size", [37, 64, 100, 499, 500, 4096])
def test_topk_matches_brute_force(emb500, k, block_size):
    sims, idx = topk_cosine(emb500, k=k, block_size=block_size)
    ref_v, ref_i, dense = _dense_topk(emb500, k)
    assert sims.shape == (500, k) and sims.dtype == np.float32
    assert idx.shape == (500, k) and idx.dtype == np.int64
    np.testing.assert_allclose(sims, ref_v, atol=1e-5)
    # indices: identical where there are no ties; always pointing at neighbours of that similarity
    np.testing.assert_allclose(np.take_along_axis(dense, idx, axis=1), sims, atol=1e-5)
    assert not (idx == np.arange(500)[:, None]).any()  # never itself
    assert all(len(set(row)) == k for row in idx.tolist())  # no repeated neighbour
    ref_v1, _, _ = _dense_topk(emb500, k + 1)  # rows whose top k+1 have no (near) ties
    untied = (np.abs(np.diff(ref_v1, axis=1)) > 1e-5).all(axis=1)
    assert untied.sum() > 450
    np.testing.assert_array_equal(idx[untied], ref_i[untied])
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # most similar first


def test_duplicates_are_neighbours_but_self_is_not(emb500):
    sims, idx = topk_cosine(emb500, k=2, block_size=64)
    assert set(idx[3].tolist()) == {10, 11}
    assert set(idx[10].tolist()) == {3, 11}
    assert idx[250, 0] == 400 and idx[400, 0] == 250
    np.testing.assert_allclose(sims[3], [1.0, 1.0], atol=1e-5)


def test_small_n():
    emb = np.eye(3, dtype=np.float32)
    sims, idx = topk_cosine(emb, k=2)
    assert sims.shape == (3, 2)
    assert sorted(idx[0].tolist()) == [1, 2]
    sims, idx = topk_cosine(emb, k=5)  # N <= k: k' = N - 1
    assert sims.shape == (3, 2) and idx.shape == (3, 2)
    sims, idx = topk_cosine(np.ones((1, 4), dtype=np.float32), k=2)
    assert sims.shape == (1, 0) and idx.shape == (1, 0)
    assert np.isnan(sparsity_scores(sims)).all()
    sims, idx = topk_cosine(np.zeros((0, 4), dtype=np.float32), k=2)
    assert sims.shape == (0, 0)
    with pytest.raises(ValueError):
        topk_cosine(emb, k=0)


def test_zero_and_nonfinite_vectors_do_not_poison():
    emb = np.array([[1, 0], [0, 0], [np.nan, 1], [0.9, 0.1]], dtype=np.float32)
    sims, idx = topk_cosine(emb, k=1)
    assert np.isfinite(sims).all()
    assert idx[0, 0] == 3 and idx[3, 0] == 0


def test_never_allocates_n_by_n(monkeypatch):
    n, block = 10_000, 512  # a dense float32 N×N would be 400 MB
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(n, 32)).astype(np.float32)
    real_mm = torch.mm
    biggest = [0]

    def checked_mm(a, b, *args, **kwargs):
        biggest[0] = max(biggest[0], a.shape[0] * b.shape[1])
        assert a.shape[0] <= block and b.shape[1] <= block
        return real_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", checked_mm)
    t0 = time.perf_counter()
    sims, idx = topk_cosine(emb, k=2, block_size=block)
    elapsed = time.perf_counter() - t0
    assert biggest[0] == block * block
    assert sims.shape == (n, 2)
    # spot-check a few rows against a direct computation
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for i in (0, 4321, n - 1):
        s = x @ x[i]
        s[i] = -np.inf
        np.testing.assert_allclose(sims[i], np.sort(s)[::-1][:2], atol=1e-5)
    print(f"topk_cosine N={n} block={block}: {elapsed:.2f}s")


def test_sparsity_scores():
    sims = np.array([[0.9, 0.7], [0.2, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(sparsity_scores(sims), [0.8, 0.1], atol=1e-7)


def _blobs(n_per=40, seed=0, dim=16, centers=3):
    rng = np.random.default_rng(seed)
    c = np.eye(dim)[:centers] * 10
    x = np.concatenate([c[j] + rng.normal(scale=0.3, size=(n_per, dim)) for j in range(centers)])
    truth = np.repeat(np.arange(centers), n_per)
    return x.astype(np.float32), truth


def test_kmeans_on_separable_blobs():
    x, truth = _blobs()
    labels = kmeans_clusters(x, n_clusters=3, seed=0)
    assert labels.dtype == np.int64 and labels.shape == (120,)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    default = kmeans_clusters(x)  # sqrt(120/2) ≈ 8 clusters by default
    assert len(np.unique(default)) == default_n_clusters(120) == 8


def test_default_n_clusters():
    assert default_n_clusters(2) == 2
    assert default_n_clusters(1) == 1
    assert default_n_clusters(8) == 2
    assert default_n_clusters(200) == 10
    assert default_n_clusters(10**6) == 50


def test_kmeans_small_inputs():
    assert kmeans_clusters(np.zeros((0, 4))).shape == (0,)
    assert kmeans_clusters(np.ones((1, 4))).tolist() == [0]
    assert kmeans_clusters(np.ones((5, 4)), n_clusters=3).tolist() == [0] * 5  # one distinct point
    assert len(kmeans_clusters(np.eye(4), n_clusters=10)) == 4


def test_cluster_dynamics():
    assert cluster_dynamics(None, None, ["a"], [0]) == {}
    assert cluster_dynamics([], np.array([]), ["a"], [0]) == {}
    x, truth = _blobs()
    ids = [f"s{i}" for i in range(len(truth))]
    d = cluster_dynamics(ids, truth, ids, (truth + 1) % 3)  # same partition, other names
    assert d["adjusted_rand_index"] == pytest.approx(1.0)
    assert d["normalized_mutual_info"] == pytest.approx(1.0)
    assert d["n_shared"] == 120 and d["n_new"] == 0 and d["n_gone"] == 0
    assert d["cluster_sizes"] == [40, 40, 40] and d["prev_cluster_sizes"] == [40, 40, 40]

    # only shared ids count: previous round had 20 ids that are gone, this round 10 new ones
    prev_ids = [f"old{i}" for i in range(20)] + ids[:100]
    prev_labels = np.concatenate([np.zeros(20, dtype=int), truth[:100]])
    cur_ids = ids[:100] + [f"new{i}" for i in range(10)]
    cur_labels = np.concatenate([truth[:100], np.full(10, 2)])
    d = cluster_dynamics(prev_ids, prev_labels, cur_ids, cur_labels)
    assert d["n_shared"] == 100 and d["n_new"] == 10 and d["n_gone"] == 20
    assert d["adjusted_rand_index"] == pytest.approx(1.0)

    # a reshuffled clustering scores low
    rng = np.random.default_rng(0)
    d = cluster_dynamics(ids, truth, ids, rng.permutation(truth))
    assert d["adjusted_rand_index"] < 0.2
    d = cluster_dynamics(["a"], [0], ["a"], [1])
    assert np.isnan(d["adjusted_rand_index"]) and d["n_shared"] == 1


def test_map_pca_fallback_for_small_n():
    rng = np.random.default_rng(0)
    xy, method = umap_2d(rng.normal(size=(6, 8)))
    assert method == "pca" and xy.shape == (6, 2) and xy.dtype == np.float32
    assert np.isfinite(xy).all()
    xy, method = umap_2d(rng.normal(size=(1, 8)))
    assert method == "pca" and xy.shape == (1, 2)
    xy, method = umap_2d(np.zeros((0, 8)))
    assert method == "none" and xy.shape == (0, 2)


def test_umap_is_imported_lazily():
    import sys

    src = open(diversity.__file__).read()
    assert "\nimport umap" not in src and "\nfrom umap" not in src
    # importing the module must not import umap (slow): checked in a clean interpreter
    import subprocess

    code = "import sys, middo_pipeline.core.diversity; print('umap' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.slow
def test_umap_map():
    x, truth = _blobs(n_per=30)
    xy, method = umap_2d(x, seed=0, n_neighbors=10)
    assert method == "umap" and xy.shape == (90, 2) and np.isfinite(xy).all()


# ----------------------------------------------------------------------------------------------
# approximate top-k (faiss IVF) and the auto switch


def _clustered(n=3000, dim=32, centers=30, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    return (c[rng.integers(0, centers, n)] + noise * rng.normal(size=(n, dim))).astype(np.float32)


def _recall(idx_a, idx_b):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(idx_a.tolist(), idx_b.tolist())]))


@pytest.fixture(scope="module")
def clustered3k():
    return _clustered()


def test_approx_matches_exact_on_clustered_data(clustered3k):
    k = 5
    ex_s, ex_i = topk_cosine(clustered3k, k=k, method="exact")
    ap_s, ap_i, info = topk_cosine(clustered3k, k=k, method="approx", return_info=True)
    assert info["method"] == "approx" and info["nlist"] == round(4 * np.sqrt(3000)) and info["nprobe"] == 16
    assert ap_s.shape == (3000, k) and ap_s.dtype == np.float32 and ap_i.dtype == np.int64
    assert _recall(ap_i, ex_i) >= 0.95
    n = len(clustered3k)
    assert not (ap_i == np.arange(n)[:, None]).any()  # never itself
    assert (ap_i >= 0).all() and np.isfinite(ap_s).all()
    assert all(len(set(row)) == k for row in ap_i.tolist())
    assert (np.diff(ap_s, axis=1) <= 1e-6).all()  # most similar first
    # the similarities are the true cosines of the neighbours it returns, never above the exact ones
    x = clustered3k / np.linalg.norm(clustered3k, axis=1, keepdims=True)
    np.testing.assert_allclose(ap_s, np.einsum("nd,nkd->nk", x, x[ap_i]), atol=1e-5)
    assert (ap_s <= ex_s + 1e-5).all()


def test_approx_self_excluded_and_duplicates_are_neighbours():
    emb = _clustered(n=2000, seed=1)
    emb[100:107] = emb[99]  # a group of 8 identical rows: more than k + 1
    emb[500] = emb[42] * 3.0  # a pair (same direction)
    sims, idx = topk_cosine(emb, k=3, method="approx")
    group = set(range(99, 107))
    for i in group:
        assert i not in idx[i] and set(idx[i].tolist()) <= group - {i}
        np.testing.assert_allclose(sims[i], 1.0, atol=1e-5)
    assert idx[42, 0] == 500 and idx[500, 0] == 42
    assert not (idx == np.arange(len(emb))[:, None]).any()


def test_approx_rows_with_too_few_candidates_are_recomputed_exactly(clustered3k):
    emb = clustered3k[:400]
    # ~4 rows per list, 1 list probed: many rows find fewer than k others and fall back to exact
    sims, idx, info = topk_cosine(emb, k=3, method="approx", nlist=100, nprobe=1, return_info=True)
    assert 0 < info["exact_fallback_rows"] < 400
    assert (idx >= 0).all() and np.isfinite(sims).all()  # no -1 / NaN padding left
    assert not (idx == np.arange(400)[:, None]).any()
    assert all(len(set(row)) == 3 for row in idx.tolist())
    ex_s, _ = topk_cosine(emb, k=3, method="exact")
    assert (sims <= ex_s + 1e-5).all()
    # every row fell back: the result is the exact one
    sims, idx, info = topk_cosine(emb, k=3, method="approx", nlist=400, nprobe=1, return_info=True)
    assert info["exact_fallback_rows"] == 400
    np.testing.assert_allclose(sims, ex_s, atol=1e-6)


def test_approx_small_n():
    rng = np.random.default_rng(0)
    sims, idx = topk_cosine(rng.normal(size=(5, 8)).astype(np.float32), k=10, method="approx")
    assert sims.shape == (5, 4) and sorted(idx[0].tolist()) == [1, 2, 3, 4]
    sims, idx = topk_cosine(np.ones((1, 4), dtype=np.float32), k=2, method="approx")
    assert sims.shape == (1, 0)


def test_auto_is_exact_below_the_threshold_and_approx_above(clustered3k, monkeypatch):
    _, _, info = topk_cosine(clustered3k, k=2, return_info=True)
    assert neighbours.EXACT_MAX_ROWS >= 100_000 and info["method"] == "exact"
    monkeypatch.setattr(neighbours, "EXACT_MAX_ROWS", 1000)
    sims, idx, info = topk_cosine(clustered3k, k=2, return_info=True)
    assert info["method"] == "approx"
    _, ex_i = topk_cosine(clustered3k, k=2, method="exact")
    assert _recall(idx, ex_i) >= 0.95
    _, _, info = topk_cosine(clustered3k[:1000], k=2, return_info=True)  # at the threshold: exact
    assert info["method"] == "exact"
    with pytest.raises(ValueError):
        topk_cosine(clustered3k, k=2, method="fast")


def test_topk_cosine_rows_matches_full_exact(emb500):
    rows = np.array([3, 0, 499, 250, 3])
    s, i = neighbours.topk_cosine_rows(emb500, rows, k=3, block_size=64)
    fs, fi = topk_cosine(emb500, k=3, block_size=64)
    np.testing.assert_allclose(s, fs[rows], atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(_dense_topk(emb500, 3)[2][rows], i, axis=1), s, atol=1e-5)


def test_embedding_config_validates_knn_method():
    from middo_pipeline.assets.signals import EmbeddingSignalConfig

    assert EmbeddingSignalConfig().knn_method == "auto"
    assert EmbeddingSignalConfig(knn_method="approx").knn_method == "approx"
    with pytest.raises(Exception, match="knn_method"):
        EmbeddingSignalConfig(knn_method="fast")


def test_cosine_to_rows_pairs_each_query_with_its_row():
    from middo_pipeline.core.neighbours import cosine_to_rows

    keys = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=np.float32)
    queries = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 5.0]], dtype=np.float32)
    got = cosine_to_rows(queries, keys, np.array([0, 1, -1]))
    np.testing.assert_allclose(got[:2], [1.0, 0.0], atol=1e-6)
    assert np.isnan(got[2])  # no row: unknown, not zero
    assert cosine_to_rows(queries[:0], keys, np.zeros(0, dtype=np.int64)).shape == (0,)
