"""The diversity signal: the embedding space (top principal directions removed), sparsity
over the top-k cosine neighbours (found by ``neighbours.topk_cosine``), clusters and their
dynamics across rounds, and a 2-D map.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np

from middo_pipeline.core.neighbours import normalize

log = logging.getLogger(__name__)

__all__ = [
    "TopComponents",
    "sparsity_scores",
    "kmeans_clusters",
    "default_n_clusters",
    "cluster_dynamics",
    "umap_2d",
]

UMAP_MIN_SAMPLES = 10  # below this, the 2-D map is a PCA projection


class TopComponents:
    """Centre the embeddings and remove their top ``n`` principal directions.

    Hidden states of a language model share a few dominant directions (a common offset, token
    frequency) that make every cosine similarity high and compress the differences between
    topics; removing them ("all-but-the-top", Mu & Viswanath, ICLR 2018) spreads the
    similarities out. Fitted on the round's samples and applied unchanged to anything compared
    with them (candidates), so both live in the same space. ``n = 0`` is the identity."""

    def __init__(self, n: int = 1):
        if n < 0:
            raise ValueError(f"components to remove must be >= 0, got {n}")
        self.n = int(n)
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None

    def fit(self, emb: np.ndarray) -> TopComponents:
        x = np.asarray(emb, dtype=np.float64)
        x = np.where(np.isfinite(x), x, 0.0)
        if self.n == 0 or x.shape[0] < 2:
            return self
        self.mean = x.mean(axis=0)
        c = x - self.mean
        # the d x d covariance, not the N x d SVD: cheap at 1M rows
        vals, vecs = np.linalg.eigh(c.T @ c)
        k = min(self.n, vecs.shape[1])
        self.components = vecs[:, ::-1][:, :k].T.copy()
        return self

    def transform(self, emb: np.ndarray) -> np.ndarray:
        x = np.asarray(emb, dtype=np.float32)
        if self.mean is None or self.components is None:
            return x
        c = x.astype(np.float64) - self.mean
        c -= (c @ self.components.T) @ self.components
        return c.astype(np.float32)


def sparsity_scores(sims: np.ndarray) -> np.ndarray:
    """Mean similarity to the top-k neighbours per sample (low = sparse); NaN without neighbours."""
    s = np.asarray(sims, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"sims must be (N, k), got shape {s.shape}")
    if s.shape[1] == 0:
        return np.full(s.shape[0], np.nan, dtype=np.float64)
    return s.mean(axis=1)


def default_n_clusters(n: int) -> int:
    """clamp(round(sqrt(N / 2)), 2, 50), never more than N."""
    c = int(min(max(round(math.sqrt(n / 2)), 2), 50))
    return max(1, min(c, n))


def kmeans_clusters(emb: np.ndarray, n_clusters: int | None = None, seed: int = 0) -> np.ndarray:
    """k-means labels (int64, 0..C-1) on L2-normalised embeddings (spherical-ish k-means).

    KMeans up to 20k samples, MiniBatchKMeans above. ``n_clusters`` defaults to
    ``default_n_clusters(N)`` and is capped at N."""
    x = normalize(emb)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    c = default_n_clusters(n) if n_clusters is None else int(n_clusters)
    if c < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    c = min(c, n)
    if c == 1:
        return np.zeros(n, dtype=np.int64)
    # fewer distinct points than clusters: k-means would warn and produce empty clusters
    n_distinct = len(np.unique(x, axis=0)) if n <= 20000 else n
    c = min(c, n_distinct)
    if c <= 1:
        return np.zeros(n, dtype=np.int64)
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if n <= 20000:
        km = KMeans(n_clusters=c, n_init=3, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters=c, n_init=3, random_state=seed, batch_size=4096)
    return km.fit_predict(x.astype(np.float64)).astype(np.int64)


def cluster_dynamics(
    prev_ids: Sequence[str] | None,
    prev_labels: Sequence[int] | np.ndarray | None,
    ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
) -> dict:
    """How the clustering changed since the previous round, on the samples present in both.

    Returns {} without a previous round. Otherwise: ``adjusted_rand_index`` and
    ``normalized_mutual_info`` over the shared sample ids (NaN with fewer than 2 shared),
    ``n_shared``, ``n_new`` (ids only in this round), ``n_gone`` (only in the previous),
    ``n_clusters`` / ``prev_n_clusters`` and the cluster size lists."""
    if prev_ids is None or prev_labels is None or len(prev_ids) == 0:
        return {}
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    prev_labels = np.asarray(prev_labels).astype(np.int64)
    labels = np.asarray(labels).astype(np.int64)
    if len(prev_ids) != len(prev_labels) or len(ids) != len(labels):
        raise ValueError("ids and labels must have the same length")
    prev_map: dict[str, int] = {}
    for sid, lab in zip(prev_ids, prev_labels.tolist()):
        prev_map.setdefault(sid, lab)
    cur_map: dict[str, int] = {}
    for sid, lab in zip(ids, labels.tolist()):
        cur_map.setdefault(sid, lab)
    shared = [sid for sid in cur_map if sid in prev_map]
    a = [prev_map[s] for s in shared]
    b = [cur_map[s] for s in shared]
    if len(shared) >= 2:
        ari = float(adjusted_rand_score(a, b))
        nmi = float(normalized_mutual_info_score(a, b))
    else:
        ari = nmi = float("nan")
    sizes = np.bincount(labels).tolist() if labels.size else []
    prev_sizes = np.bincount(prev_labels).tolist() if prev_labels.size else []
    return {
        "adjusted_rand_index": ari,
        "normalized_mutual_info": nmi,
        "n_shared": len(shared),
        "n_new": sum(1 for s in cur_map if s not in prev_map),
        "n_gone": sum(1 for s in prev_map if s not in cur_map),
        "n_clusters": int(len(np.unique(labels))),
        "prev_n_clusters": int(len(np.unique(prev_labels))),
        "cluster_sizes": sizes,
        "prev_cluster_sizes": prev_sizes,
    }


def _pca_2d(x: np.ndarray) -> np.ndarray:
    n, d = x.shape
    out = np.zeros((n, 2), dtype=np.float32)
    n_comp = min(2, n, d)
    if n < 2 or n_comp < 1:
        return out
    from sklearn.decomposition import PCA

    proj = PCA(n_components=n_comp, random_state=0).fit_transform(x.astype(np.float64))
    out[:, :n_comp] = proj.astype(np.float32)
    return out


def umap_2d(emb: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> tuple[np.ndarray, str]:
    """A 2-D map of the (normalised) embeddings: ``(xy float32 (N, 2), method)``.

    ``method`` is "umap", or "pca" when N < ``UMAP_MIN_SAMPLES`` (UMAP needs a neighbourhood)
    or when UMAP fails; "none" for N == 0. umap is imported lazily (seconds; numba compiles
    for ~15 s in every fresh process on first fit)."""
    x = normalize(emb)
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 2), dtype=np.float32), "none"
    if n < UMAP_MIN_SAMPLES:
        return _pca_2d(x), "pca"
    try:
        import umap  # noqa: PLC0415 (slow import, kept off module import)

        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=max(2, min(int(n_neighbors), n - 1)),
            metric="cosine",
            random_state=seed,
            n_jobs=1,  # a seeded UMAP is single-threaded anyway (and says so in a warning otherwise)
            init="spectral" if n > 20 else "random",
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            xy = reducer.fit_transform(x)
        return np.asarray(xy, dtype=np.float32), "umap"
    except Exception as exc:  # a map is a view, not a result: fall back rather than fail the round
        log.warning("UMAP failed (%s: %s); using PCA for the map", type(exc).__name__, exc)
        return _pca_2d(x), "pca"
