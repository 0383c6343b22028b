"""Diversity top-k: ours (``neighbours.topk_cosine``) against a dense N x N similarity.

Random standard-normal embeddings of the default model's width (576), k = 2 (the reference's
k), itself excluded. Each measurement runs in a fresh subprocess so that its peak memory is
its own: the embeddings are made first, then the process's resident memory (RSS) is sampled
every 2 ms by a thread while the top-k runs (on a GPU: ``torch.cuda.max_memory_allocated``
instead); the figure is the peak above the level before the call. The input embeddings
themselves (N x 576 x 4 bytes) are not counted on either side.

Ours has two methods, and ``method="auto"`` picks exact up to ``EXACT_MAX_ROWS`` (200k) rows
and approx above; ``sizes.<n>.ours`` is what auto runs at that size (exact at 10k / 100k,
approx at 1M), and ``ours_exact`` / ``ours_approx`` hold both methods:

- exact: blockwise all-pairs (never N x N, but N^2 work). Measured up to ``EXACT_MAX_ROWS``
  (or on a GPU); beyond, time is extrapolated by N^2 from the largest measured size and memory
  by a straight line through the two largest (``measured: false``).
- approx: faiss IVF-Flat on inner product. Measured at every size, 1M included (in --quick
  too); if it fails or times out there, time is extrapolated by N^1.5 (its work grows as
  N * sqrt(N)). Its ``recall_at_k`` is the fraction of the exact top-k ids it returns, on 1,000
  random queries whose exact top-k is computed blockwise against all N rows. Random Gaussian
  vectors in 576 dims have no neighbourhood structure (a nearest neighbour is barely closer than
  a random row), so recall on them is a pessimistic floor; ``clustered`` repeats the approx
  measurement at the largest measured exact size on a mixture of 1,000 Gaussian clusters
  (centres and noise both standard normal), closer to real embeddings.

The dense side is the reference's ``compute_cosine_similarity_torch`` + ``topk``: normalise,
``E @ E.T`` (N x N float32), diagonal to -inf, top-k per row (vectorised here, which only
helps it). It is measured where its matrix fits (``knn_dense_max_bytes``); beyond that its
memory is computed (N^2 x 4 bytes for the matrix alone, a lower bound) and marked
``measured: false``. At 10k the two sides' answers are compared.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time

from benchmarks.common import REPO, log

DIM = 576  # SmolLM2-135M hidden size
K = 2


# ----------------------------------------------------------------------------------------------
# the worker (a fresh process per measurement)


def _embeddings(n: int, dim: int, seed: int, data: str = "random"):
    import numpy as np

    rng = np.random.default_rng(seed)
    if data == "clustered":  # 1,000 Gaussian clusters: centre and noise both standard normal
        centres = rng.standard_normal((1000, dim), dtype=np.float32)
        out = rng.standard_normal((n, dim), dtype=np.float32)
        for c0 in range(0, n, 1 << 16):  # in chunks: no second N x dim temporary
            out[c0 : c0 + (1 << 16)] += centres[rng.integers(0, len(centres), min(1 << 16, n - c0))]
        return out
    return rng.standard_normal((n, dim), dtype=np.float32)


def _dense_topk(emb, k: int, device: str):
    import torch
    import torch.nn.functional as F

    e = torch.from_numpy(emb).to(device)
    e = F.normalize(e.float(), p=2, dim=1)
    sim = e @ e.t()  # N x N
    sim.fill_diagonal_(-float("inf"))
    vals, idx = torch.topk(sim, k=k, dim=1, largest=True)
    return vals.cpu().numpy(), idx.cpu().numpy()


def _ours_topk(emb, k: int, device: str, block_size: int | None, knn_method: str = "auto", info: dict | None = None):
    from middo_pipeline.core.neighbours import topk_cosine

    kwargs = {"k": k}
    params = inspect.signature(topk_cosine).parameters
    if block_size and "block_size" in params:
        kwargs["block_size"] = block_size
    if "device" in params and device != "cpu":
        kwargs["device"] = device
    if "method" in params:
        kwargs["method"] = knn_method
        kwargs["return_info"] = True
        sims, idx, used = topk_cosine(emb, **kwargs)
    else:
        sims, idx = topk_cosine(emb, **kwargs)
        used = {"method": "exact"}
    if info is not None:
        info.update(used)
    return sims, idx


def _recall_at_k(emb, idx, k: int, n_queries: int, seed: int, device: str) -> dict:
    """Fraction of the exact top-k ids found, on ``n_queries`` random rows (exact: blockwise
    against all N rows)."""
    import numpy as np

    from middo_pipeline.core.neighbours import topk_cosine_rows

    n = len(emb)
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, min(n_queries, n), replace=False))
    t0 = time.perf_counter()
    ex_s, ex_i = topk_cosine_rows(emb, rows, k=k, device=device)
    got = np.asarray(idx)[rows]
    hits = [len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(got.tolist(), ex_i.tolist())]
    return {
        "recall_at_k": float(np.mean(hits)),
        "recall_queries": int(len(rows)),
        "recall_top1": float(np.mean(got[:, 0] == ex_i[:, 0])),
        "exact_mean_top1_similarity": float(ex_s[:, 0].mean()),
        "recall_check_seconds": time.perf_counter() - t0,
    }


def worker(args) -> dict:
    import numpy as np
    import torch

    from benchmarks.common import PeakRSS

    if args.threads:
        torch.set_num_threads(args.threads)
    emb = _embeddings(args.n, args.dim, args.seed, args.data)
    cuda = args.device.startswith("cuda")
    fn = _dense_topk if args.method == "dense" else _ours_topk
    used: dict = {}
    call = (
        (lambda: fn(emb, args.k, args.device))
        if args.method == "dense"
        else (lambda: fn(emb, args.k, args.device, args.block_size, args.knn_method, used))
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        sims, idx = call()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    out = {
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
        "method": used.get("method", args.method),
        "seconds": seconds,
        "peak_rss_delta_bytes": mem.delta,
        "rss_baseline_bytes": mem.baseline,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "data": args.data,
    }
    if used:
        out["info"] = {k: v for k, v in used.items() if k != "method"}
    if cuda:
        out["peak_gpu_delta_bytes"] = int(torch.cuda.max_memory_allocated() - base_gpu)
    out["peak_bytes"] = out.get("peak_gpu_delta_bytes", out["peak_rss_delta_bytes"])
    if args.recall_queries and args.method == "ours":
        out.update(_recall_at_k(emb, idx, args.k, args.recall_queries, args.seed, args.device))
    if args.check:
        other = (
            _ours_topk(emb, args.k, args.device, args.block_size)
            if args.method == "dense"
            else _dense_topk(emb, args.k, args.device)
        )
        s2, i2 = np.asarray(other[0]), np.asarray(other[1])
        s1, i1 = np.asarray(sims), np.asarray(idx)
        out["check"] = {
            "max_abs_sim_diff": float(np.max(np.abs(np.sort(s1, axis=1) - np.sort(s2, axis=1)))),
            "neighbour_sets_equal_fraction": float(
                np.mean([set(a) == set(b) for a, b in zip(i1.tolist(), i2.tolist())])
            ),
        }
    return out


# ----------------------------------------------------------------------------------------------
# the driver


def _measure(
    n: int,
    method: str,
    settings,
    check: bool = False,
    knn_method: str = "auto",
    data: str = "random",
    recall_queries: int = 0,
) -> dict:
    device = "cuda" if _cuda_available() and settings.device in ("auto", "cuda") else "cpu"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.knn",
        "--worker",
        "--n",
        str(n),
        "--method",
        method,
        "--dim",
        str(DIM),
        "--k",
        str(K),
        "--seed",
        str(settings.seed),
        "--device",
        device,
        "--knn-method",
        knn_method,
        "--data",
        data,
        "--recall-queries",
        str(recall_queries),
    ]
    if settings.threads:
        cmd += ["--threads", str(settings.threads)]
    if check:
        cmd.append("--check")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=settings.knn_timeout_s)
    except subprocess.TimeoutExpired:
        return {
            "n": n,
            "method": method if method == "dense" else knn_method,
            "measured": False,
            "error": f"did not finish within {settings.knn_timeout_s}s",
        }
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            "n": n,
            "method": method if method == "dense" else knn_method,
            "measured": False,
            "error": f"exit {proc.returncode}: {' | '.join(tail)[:400]}",
        }
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["measured"] = True
    res["process_seconds"] = time.perf_counter() - t0
    return res


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _extrapolate_time(points: list[tuple[int, float]], n: int, power: float = 2.0) -> float:
    """Exact all-pairs top-k does N^2 work: scale the largest measured time by (n / N)^2
    (approx, IVF with nlist ~ sqrt(N): N^1.5)."""
    n2, t2 = max(points)
    return t2 * (n / n2) ** power


def _extrapolate_memory(points: list[tuple[int, float]], n: int) -> float:
    """Blockwise top-k holds a fixed set of tiles plus a few arrays per row: a straight line
    (intercept = tiles, slope = bytes per row) through the two largest measured sizes."""
    (n1, m1), (n2, m2) = sorted(points)[-2:]
    slope = max((m2 - m1) / (n2 - n1), 0.0)
    return m2 + slope * (n - n2)


def _free_bytes(device: str) -> int:
    """Memory the dense matrix could use on the device that runs it."""
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info()[0])
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return 0


def _exact_max_rows() -> int:
    try:
        from middo_pipeline.core.neighbours import EXACT_MAX_ROWS

        return int(EXACT_MAX_ROWS)
    except ImportError:  # pragma: no cover (a module without it: exact only)
        return 1 << 62


RECALL_QUERIES = 1000


def run(settings) -> dict:
    measured_sizes = sorted(settings.knn_sizes)
    sizes = sorted(set(measured_sizes) | set(settings.knn_extrapolate))
    device = "cuda" if _cuda_available() and settings.device in ("auto", "cuda") else "cpu"
    exact_max = _exact_max_rows()
    # measure the dense matrix only where it (with its temporaries) surely fits
    dense_limit = min(settings.knn_dense_max_bytes, int(0.4 * _free_bytes(device)))
    out: dict = {
        "dim": DIM,
        "k": K,
        "device": device,
        "dense_measure_limit_bytes": dense_limit,
        "auto_exact_max_rows": exact_max,
        "recall_queries": RECALL_QUERIES,
        "sizes": {},
    }
    exact_pts_t, exact_pts_m, approx_pts_t, approx_pts_m = [], [], [], []

    def show(tag: str, n: int, r: dict) -> None:
        if r.get("measured"):
            rec = f", recall@{K} {r['recall_at_k']:.3f}" if "recall_at_k" in r else ""
            log(f"knn: {tag} N={n:,}: {r['seconds']:.1f}s, peak +{r['peak_bytes'] / 2**20:.0f} MiB{rec}")
        else:
            log(f"knn: {tag} N={n:,}: {r.get('error')}")

    for n in sizes:
        # exact: measured where auto would run it (or on a GPU), else extrapolated below
        exact = None
        if n in measured_sizes and (n <= exact_max or device == "cuda"):
            log(f"knn: ours (exact) at N={n:,}")
            exact = _measure(n, "ours", settings, knn_method="exact")
            if exact.get("measured"):
                exact["recall_at_k"] = 1.0  # exact by construction (checked against dense at the smallest size)
                exact_pts_t.append((n, exact["seconds"]))
                exact_pts_m.append((n, max(exact["peak_bytes"], 1)))
            show("ours (exact)", n, exact)
        # approx: measured at every size, the extrapolated ones included
        log(f"knn: ours (approx) at N={n:,}")
        approx = _measure(n, "ours", settings, knn_method="approx", recall_queries=RECALL_QUERIES)
        if approx.get("measured"):
            approx_pts_t.append((n, approx["seconds"]))
            approx_pts_m.append((n, max(approx["peak_bytes"], 1)))
        show("ours (approx)", n, approx)
        if exact is None or not exact.get("measured"):
            if len(exact_pts_t) >= 2:
                exact = {
                    "n": n,
                    "method": "exact",
                    "measured": False,
                    "seconds": _extrapolate_time(exact_pts_t, n),
                    "peak_bytes": _extrapolate_memory(exact_pts_m, n),
                    "recall_at_k": 1.0,
                    "how": "time: the largest measured size scaled by N^2 (exact all-pairs work); memory: a "
                    "straight line through the two largest measured sizes (fixed tiles + bytes per row)",
                    **({"error": exact["error"]} if exact and exact.get("error") else {}),
                }
                log(
                    f"knn: ours (exact) N={n:,} extrapolated: {exact['seconds']:.0f}s, peak {exact['peak_bytes'] / 2**20:.0f} MiB"
                )
        if not approx.get("measured") and len(approx_pts_t) >= 2:
            approx = {
                "n": n,
                "method": "approx",
                "measured": False,
                "seconds": _extrapolate_time(approx_pts_t, n, 1.5),
                "peak_bytes": _extrapolate_memory(approx_pts_m, n),
                "error": approx.get("error"),
                "how": "time: the largest measured size scaled by N^1.5 (IVF with nlist ~ sqrt(N)); memory: a "
                "straight line through the two largest measured sizes",
            }
        ours = approx if n > exact_max else (exact or {"n": n, "method": "exact", "measured": False})
        ours = {**ours, "method": "approx" if n > exact_max else "exact"}

        dense_matrix = n * n * 4
        if n in measured_sizes and dense_matrix <= dense_limit:
            log(f"knn: dense at N={n:,}")
            dense = _measure(n, "dense", settings, check=(n == measured_sizes[0]))
            if dense.get("measured"):
                log(f"knn: dense N={n:,}: {dense['seconds']:.1f}s, peak +{dense['peak_bytes'] / 2**20:.0f} MiB")
        else:
            dense = {
                "n": n,
                "method": "dense",
                "measured": False,
                "reason": f"the N x N float32 matrix alone needs {dense_matrix / 2**30:,.1f} GiB "
                f"(over the {dense_limit / 2**30:.1f} GiB measuring limit: 40% of free memory)",
            }
        dense["matrix_bytes"] = dense_matrix
        if not dense.get("measured"):
            dense["peak_bytes"] = dense_matrix  # computed: the matrix alone (a lower bound)
        entry = {"ours": ours, "dense": dense}
        if exact is not None:
            entry["ours_exact"] = exact
        entry["ours_approx"] = approx
        if ours.get("peak_bytes") is not None:
            entry["memory_ratio_dense_over_ours"] = dense["peak_bytes"] / max(ours["peak_bytes"], 1)
            if dense.get("measured") and ours.get("measured"):
                entry["speedup_vs_dense"] = dense["seconds"] / ours["seconds"]
        if exact is not None and exact.get("seconds") and approx.get("seconds"):
            entry["speedup_approx_vs_exact"] = exact["seconds"] / approx["seconds"]
        out["sizes"][str(n)] = entry

    # recall on structured data: approx at the largest size where exact is measured
    n_cl = max([n for n in measured_sizes if n <= exact_max] or [min(sizes)])
    log(f"knn: ours (approx) on clustered data at N={n_cl:,}")
    cl = _measure(n_cl, "ours", settings, knn_method="approx", data="clustered", recall_queries=RECALL_QUERIES)
    show("ours (approx, clustered)", n_cl, cl)
    out["clustered"] = cl
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="one top-k measurement (used by the benchmark driver)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--k", type=int, default=K)
    p.add_argument("--method", choices=["ours", "dense"], required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--check", action="store_true")
    p.add_argument("--knn-method", choices=["auto", "exact", "approx"], default="auto")
    p.add_argument("--data", choices=["random", "clustered"], default="random")
    p.add_argument("--recall-queries", type=int, default=0, help="check recall@k on this many queries (ours)")
    args = p.parse_args(argv)
    print(json.dumps(worker(args)))


if __name__ == "__main__":
    main()
