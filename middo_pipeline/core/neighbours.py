"""Cosine nearest neighbours without the N×N matrix: the top-k of every row (``topk_cosine``),
and queries against a set of keys (``max_cosine_to``, ``top_cosine_to``, ``cosine_to_rows``).

``topk_cosine``'s exact method streams block × block tiles (``block_size`` queries against
``block_size`` keys) through ``torch.mm`` and keeps a running top-k per query, so memory is
O(block_size² + N·k) but work is all-pairs (N²·dim: ~2 min at 100k on 2 cores, hours at 1M).
Its approximate method (faiss IVF-Flat on inner product, lists scanned with BLAS) does
~N^1.5·dim work and is the default above ``EXACT_MAX_ROWS`` rows. Either way the self-match is
excluded by index (an exact duplicate at another index is a real neighbour, with similarity 1).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, get_args

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "normalize",
    "max_cosine_to",
    "top_cosine_to",
    "cosine_to_rows",
    "topk_cosine",
    "topk_cosine_rows",
    "KnnMethod",
    "KNN_METHODS",
    "EXACT_MAX_ROWS",
]

KnnMethod = Literal["auto", "exact", "approx"]
KNN_METHODS: tuple[str, ...] = get_args(KnnMethod)
EXACT_MAX_ROWS = 200_000  # method="auto": exact top-k up to this many rows, approximate above
APPROX_NPROBE = 16  # IVF lists searched per row
APPROX_TRAIN_PER_LIST = 25  # k-means training rows per list (subsampled)
APPROX_KMEANS_ITERS = 10


def max_cosine_to(queries: np.ndarray, keys: np.ndarray, block_size: int = 4096) -> np.ndarray:
    """For each query row, its highest cosine similarity to any key row (float64 (Q,); NaN when
    there is no key)."""
    q, kx = normalize(queries), normalize(keys)
    if q.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    if kx.shape[0] == 0:
        return np.full(q.shape[0], np.nan)
    out = np.full(q.shape[0], -np.inf)
    for a in range(0, kx.shape[0], block_size):
        out = np.maximum(out, (q @ kx[a : a + block_size].T).max(axis=1))
    return out.astype(np.float64)


def top_cosine_to(
    queries: np.ndarray, keys: np.ndarray, m: int, block_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, its ``m`` most similar key rows: (cosines (Q, m') float64, highest
    first; key indices (Q, m') int64), m' = min(m, number of keys)."""
    q, kx = normalize(queries), normalize(keys)
    m = min(int(m), kx.shape[0])
    vals = np.zeros((q.shape[0], 0), dtype=np.float64)
    idx = np.zeros((q.shape[0], 0), dtype=np.int64)
    if m <= 0 or q.shape[0] == 0:
        return vals.reshape(q.shape[0], 0), idx.reshape(q.shape[0], 0)
    for a in range(0, kx.shape[0], block_size):
        sims = (q @ kx[a : a + block_size].T).astype(np.float64)
        vals = np.concatenate([vals, sims], axis=1)
        idx = np.concatenate([idx, np.broadcast_to(np.arange(a, a + sims.shape[1]), sims.shape)], axis=1)
        if vals.shape[1] > m:
            keep = np.argpartition(-vals, m - 1, axis=1)[:, :m]
            vals, idx = np.take_along_axis(vals, keep, axis=1), np.take_along_axis(idx, keep, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def cosine_to_rows(queries: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine similarity of query ``i`` to key row ``rows[i]`` (float64 (Q,); NaN where
    ``rows[i] < 0``: no such key)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.full(rows.shape[0], np.nan)
    have = rows >= 0
    if have.any():
        q, kx = normalize(np.asarray(queries)[have]), normalize(np.asarray(keys)[rows[have]])
        out[have] = np.sum(q * kx, axis=1, dtype=np.float64)
    return out


def normalize(emb: np.ndarray) -> np.ndarray:
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


def _topk_exact_rows(
    xt: torch.Tensor, rows: np.ndarray | None, kk: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``kk`` of the given query rows (all rows when None) against every row of the
    unit-norm ``xt``, itself excluded by index, streamed as block × block tiles."""
    dev = xt.device
    n = xt.shape[0]
    all_rows = rows is None
    rows_np = np.arange(n, dtype=np.int64) if all_rows else np.asarray(rows, dtype=np.int64)
    m = len(rows_np)
    sims_out = np.empty((m, kk), dtype=np.float32)
    idx_out = np.empty((m, kk), dtype=np.int64)
    if kk == 0 or m == 0:
        return sims_out, idx_out
    neg_inf = torch.tensor(float("-inf"), device=dev)
    with torch.no_grad():
        for q0 in range(0, m, block_size):
            q1 = min(q0 + block_size, m)
            if all_rows:
                q = xt[q0:q1]
                rows_t = torch.arange(q0, q1, device=dev)
                r_lo, r_hi = q0, q1 - 1
            else:
                rows_t = torch.from_numpy(rows_np[q0:q1]).to(dev)
                q = xt.index_select(0, rows_t)
                r_lo, r_hi = int(rows_np[q0:q1].min()), int(rows_np[q0:q1].max())
            best_v = torch.full((q1 - q0, kk), float("-inf"), device=dev)
            best_i = torch.full((q1 - q0, kk), -1, dtype=torch.long, device=dev)
            for k0 in range(0, n, block_size):
                k1 = min(k0 + block_size, n)
                s = torch.mm(q, xt[k0:k1].T)  # (bq, bk): one tile, never N×N
                if k0 <= r_hi and r_lo < k1:  # this tile may hold self matches: drop them by index
                    cols = torch.arange(k0, k1, device=dev)
                    s = torch.where(rows_t[:, None] == cols[None, :], neg_inf, s)
                cand_v = torch.cat([best_v, s], dim=1)
                cand_i = torch.cat([best_i, torch.arange(k0, k1, device=dev).expand(q1 - q0, -1)], dim=1)
                top_v, top_pos = torch.topk(cand_v, kk, dim=1, largest=True, sorted=True)
                best_v, best_i = top_v, torch.gather(cand_i, 1, top_pos)
            sims_out[q0:q1] = best_v.cpu().numpy()
            idx_out[q0:q1] = best_i.cpu().numpy()
    return sims_out, idx_out


def _faiss():
    import faiss  # noqa: PLC0415 (only the approximate path needs it)

    return faiss


def _ivf_params(n: int, nlist: int | None, nprobe: int | None, train_size: int | None) -> tuple[int, int, int]:
    nl = int(nlist) if nlist is not None else int(round(4 * math.sqrt(n)))
    nl = max(1, min(nl, n))
    npb = max(1, min(int(nprobe) if nprobe is not None else APPROX_NPROBE, nl))
    nt = int(train_size) if train_size is not None else APPROX_TRAIN_PER_LIST * nl
    nt = max(nl, min(nt, n))
    return nl, npb, nt


def _topk_ivf(
    x: np.ndarray,
    kk: int,
    nlist: int | None,
    nprobe: int | None,
    train_size: int | None,
    seed: int,
    threads: int = 1,
    chunk: int = 65536,
    query_chunk: int = 8192,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Approximate top-``kk`` of every row of the unit-norm ``x`` (IVF-Flat, inner product).

    faiss spherical k-means on a subsample gives ``nlist`` centroids; each row lives in the list
    of its nearest centroid and probes its ``nprobe`` nearest lists. The lists are then scanned
    one at a time: all queries probing list l against the members of l, as one BLAS product
    (``faiss.knn``), merged into a per-query heap of k + 1 (so the self match, which sits in its
    own list, can be dropped by index). Work ≈ N·(nlist + nprobe·N/nlist)·dim, memory
    O(N·(nprobe + k) + threads × query_chunk × dim) beyond the normalised copy; never N×N."""
    faiss = _faiss()
    n = x.shape[0]
    nl, npb, nt = _ivf_params(n, nlist, nprobe, train_size)
    t0 = time.perf_counter()
    centroids = _ivf_centroids(faiss, x, nl, nt, seed)
    t1 = time.perf_counter()
    member_order, member_lims, probe_lims, probe_queries = _ivf_lists(faiss, x, centroids, npb, chunk)
    t2 = time.perf_counter()
    kq = kk + 1  # room for the self match
    heap = faiss.ResultHeap(n, kq, keep_max=True)

    # one task = one list's members against up to ``query_chunk`` of the queries probing it
    # (bounds the gathered queries even when a list is huge, as on skewed data)
    tasks = [
        (lst, q0, min(q0 + query_chunk, probe_lims[lst + 1]))
        for lst in range(nl)
        if member_lims[lst + 1] > member_lims[lst]
        for q0 in range(probe_lims[lst], probe_lims[lst + 1], query_chunk)
    ]

    def scan(task: tuple[int, int, int]):
        lst, q0, q1 = task
        members = member_order[member_lims[lst] : member_lims[lst + 1]]
        queries = probe_queries[q0:q1]
        if threads > 1:
            faiss.omp_set_num_threads(1)  # per OS thread: one list per worker, no OpenMP barriers
        sims, pos = faiss.knn(x[queries], x[members], min(kq, len(members)), metric=faiss.METRIC_INNER_PRODUCT)
        return queries, sims, members[pos]

    # tasks are independent: ``threads`` workers scan them (faiss releases the GIL); the heap
    # is only touched here, so a query probing lists scanned at once is never raced on
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for res in pool.map(scan, tasks):
                heap.add_result_subset(*res)
    else:
        for task in tasks:
            heap.add_result_subset(*scan(task))
    heap.finalize()
    sims, idx = _without_self(heap.D, heap.I, kk)
    info = {
        "method": "approx",
        "index": "ivf_flat_ip",
        "nlist": nl,
        "nprobe": npb,
        "train_size": nt,
        "train_seconds": t1 - t0,
        "assign_seconds": t2 - t1,
        "scan_seconds": time.perf_counter() - t2,
    }
    return sims.astype(np.float32), idx.astype(np.int64), info


def _ivf_centroids(faiss, x: np.ndarray, nl: int, nt: int, seed: int) -> np.ndarray:
    """``nl`` centroids from faiss spherical k-means on ``nt`` rows of ``x`` (all when nt ≥ N)."""
    n, d = x.shape
    rng = np.random.default_rng(seed)
    sample = x if nt >= n else x[np.sort(rng.choice(n, nt, replace=False))]
    km = faiss.Kmeans(
        d,
        nl,
        niter=APPROX_KMEANS_ITERS,
        spherical=True,
        seed=int(seed),
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, -(-nt // nl)),
        verbose=False,
    )
    km.train(sample)
    return km.centroids


def _ivf_lists(faiss, x: np.ndarray, centroids: np.ndarray, npb: int, chunk: int) -> tuple:
    """The members of each list (by nearest centroid) and the queries that probe it (their
    ``npb`` nearest lists), as CSR: (member_order, member_lims, probe_lims, probe_queries)."""
    n, d = x.shape
    nl = centroids.shape[0]
    quant = faiss.IndexFlatIP(d)
    quant.add(centroids)
    assign = np.empty((n, npb), dtype=np.int64)  # the lists each row probes, nearest first
    for c0 in range(0, n, chunk):
        _, assign[c0 : c0 + chunk] = quant.search(x[c0 : c0 + chunk], npb)
    primary = assign[:, 0]
    member_order = np.argsort(primary, kind="stable")
    member_lims = np.searchsorted(primary[member_order], np.arange(nl + 1))
    flat = assign.ravel()
    probe_order = np.argsort(flat, kind="stable")
    probe_lims = np.searchsorted(flat[probe_order], np.arange(nl + 1))
    return member_order, member_lims, probe_lims, probe_order // npb


def _without_self(sims: np.ndarray, idx: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """The heap's rows (best first; unfilled slots have id -1) without the self match (by index)
    and empty slots: the best ``kk`` of what is left, NaN / -1 where fewer are."""
    n = idx.shape[0]
    valid = (idx >= 0) & (idx != np.arange(n)[:, None])
    order = np.argsort(~valid, axis=1, kind="stable")[:, :kk]
    sims = np.take_along_axis(sims, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    ok = np.take_along_axis(valid, order, axis=1)
    sims[~ok] = np.nan
    idx[~ok] = -1
    return sims, idx


def topk_cosine(
    emb: np.ndarray,
    k: int = 2,
    block_size: int = 4096,
    device: str | torch.device = "cpu",
    method: str = "auto",
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
    return_info: bool = False,
):
    """For each row, its k most cosine-similar other rows, most similar first.

    Returns ``(sims, idx)``: float32 (N, k') and int64 (N, k') with k' = min(k, N − 1), so a
    dataset with N ≤ k gets fewer neighbours (none at all when N ≤ 1) instead of invalid ones.
    With ``return_info=True``: ``(sims, idx, info)``, ``info["method"]`` being the method that ran
    ("exact" or "approx", plus the IVF parameters for approx).

    ``method``: "exact" (blockwise all-pairs, see the module docstring), "approx" (IVF-Flat on
    inner product via faiss: ``nlist`` ≈ 4·sqrt(N) lists from spherical k-means on a subsample
    of ``train_size`` rows, ``nprobe`` lists searched per row; see ``_topk_ivf``) or "auto"
    (exact up to ``EXACT_MAX_ROWS`` rows, approx above). Both exclude the row itself by index,
    so an exact duplicate elsewhere is a neighbour with similarity 1. Approx results are
    exact similarities of the neighbours it found, but may miss a true neighbour (recall < 1).
    A row whose probed lists hold fewer than k' other rows (only possible with tiny lists) is
    recomputed exactly, so every row gets k' valid neighbours; -1 / NaN never appear.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if method not in KNN_METHODS:
        raise ValueError(f"method must be one of {KNN_METHODS}, got {method!r}")
    x = normalize(emb)
    n = x.shape[0]
    kk = min(int(k), max(n - 1, 0))
    if method == "auto":
        method = "approx" if n > EXACT_MAX_ROWS else "exact"
        if method == "approx":
            try:
                _faiss()
            except ImportError:
                log.warning("faiss is not installed: exact top-k for %d rows (slow; pip install faiss-cpu)", n)
                method = "exact"
    info: dict = {"method": method}
    t0 = time.perf_counter()
    if kk == 0:
        sims = np.empty((n, 0), dtype=np.float32)
        idx = np.empty((n, 0), dtype=np.int64)
    elif method == "exact":
        sims, idx = _topk_exact_rows(torch.from_numpy(x).to(torch.device(device)), None, kk, block_size)
    else:
        faiss = _faiss()
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(max(1, torch.get_num_threads()))  # follow torch's CPU thread setting
        try:
            sims, idx, info = _topk_ivf(x, kk, nlist, nprobe, train_size, seed, threads=max(1, torch.get_num_threads()))
        finally:
            faiss.omp_set_num_threads(threads)
        short = np.flatnonzero((idx < 0).any(axis=1))
        if len(short):  # too few candidates in the probed lists: these rows exactly
            xt = torch.from_numpy(x).to(torch.device(device))
            sims[short], idx[short] = _topk_exact_rows(xt, short, kk, block_size)
        info["exact_fallback_rows"] = int(len(short))
    info["seconds"] = time.perf_counter() - t0
    log.info("top-%d cosine neighbours of %d rows: %s in %.1fs", kk, n, info, info["seconds"])
    if return_info:
        return sims, idx, info
    return sims, idx


def topk_cosine_rows(
    emb: np.ndarray,
    rows: Sequence[int] | np.ndarray,
    k: int = 2,
    block_size: int = 4096,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (itself excluded) for the given rows only, against all N rows: blockwise,
    O(len(rows)·N·dim) work. For checking an approximate result on a sample of queries."""
    x = normalize(emb)
    kk = min(int(k), max(x.shape[0] - 1, 0))
    xt = torch.from_numpy(x).to(torch.device(device))
    return _topk_exact_rows(xt, np.asarray(rows, dtype=np.int64), kk, block_size)
