"""The diversity signal: top-k cosine neighbours, sparsity, clusters and a 2-D map.

``topk_cosine`` never builds the N×N similarity matrix: it streams block × block tiles
(``block_size`` queries against ``block_size`` keys) through ``torch.mm`` and keeps a running
top-k per query, so memory is O(block_size² + N·k). The self-match is excluded by index
(an exact duplicate at another index is a real neighbour, with similarity 1).

No dagster imports here.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["topk_cosine", "sparsity_scores", "kmeans_clusters", "default_n_clusters", "cluster_dynamics", "umap_2d"]

UMAP_MIN_SAMPLES = 10  # below this, the 2-D map is a PCA projection


def _normalize(emb: np.ndarray) -> np.ndarray:
    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, dim), got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():  # a broken embedding must not poison the top-k: it becomes a zero vector
        log.warning("%d embeddings have non-finite values; treated as zero vectors", int(bad.sum()))
        x = x.copy()
        x[bad] = 0.0
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0  # a zero vector stays zero: cosine 0 with everything
    return x / norms


def topk_cosine(
    emb: np.ndarray, k: int = 2, block_size: int = 4096, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, its k most cosine-similar other rows, most similar first.

    Returns ``(sims, idx)``: float32 (N, k') and int64 (N, k') with k' = min(k, N − 1), so a
    dataset with N ≤ k gets fewer neighbours (none at all when N ≤ 1) instead of invalid ones.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    x = _normalize(emb)
    n = x.shape[0]
    kk = min(int(k), max(n - 1, 0))
    sims_out = np.empty((n, kk), dtype=np.float32)
    idx_out = np.empty((n, kk), dtype=np.int64)
    if kk == 0:
        return sims_out, idx_out
    dev = torch.device(device)
    xt = torch.from_numpy(x).to(dev)
    neg_inf = torch.tensor(float("-inf"), device=dev)
    with torch.no_grad():
        for q0 in range(0, n, block_size):
            q1 = min(q0 + block_size, n)
            q = xt[q0:q1]
            best_v = torch.full((q1 - q0, kk), float("-inf"), device=dev)
            best_i = torch.full((q1 - q0, kk), -1, dtype=torch.long, device=dev)
            rows = torch.arange(q0, q1, device=dev)
            for k0 in range(0, n, block_size):
                k1 = min(k0 + block_size, n)
                s = torch.mm(q, xt[k0:k1].T)  # (bq, bk): one tile, never N×N
                if k0 < q1 and q0 < k1:  # this tile holds some diagonal entries: drop self by index
                    cols = torch.arange(k0, k1, device=dev)
                    s = torch.where(rows[:, None] == cols[None, :], neg_inf, s)
                cand_v = torch.cat([best_v, s], dim=1)
                cand_i = torch.cat([best_i, torch.arange(k0, k1, device=dev).expand(q1 - q0, -1)], dim=1)
                top_v, top_pos = torch.topk(cand_v, kk, dim=1, largest=True, sorted=True)
                best_v, best_i = top_v, torch.gather(cand_i, 1, top_pos)
            sims_out[q0:q1] = best_v.cpu().numpy()
            idx_out[q0:q1] = best_i.cpu().numpy()
    return sims_out, idx_out


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
    x = _normalize(emb)
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
    x = _normalize(emb)
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
            init="spectral" if n > 20 else "random",
        )
        xy = reducer.fit_transform(x)
        return np.asarray(xy, dtype=np.float32), "umap"
    except Exception as exc:  # a map is a view, not a result: fall back rather than fail the round
        log.warning("UMAP failed (%s: %s); using PCA for the map", type(exc).__name__, exc)
        return _pca_2d(x), "pca"
