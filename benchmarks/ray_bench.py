"""Ray: the signal pass (loss + embedding, ``forward.score_samples``) in one process against the
Ray path (``core.distributed.RayForward``) on a local Ray cluster of the same cores.

On this machine's 2 cores: one process with 2 torch threads; Ray with 1 worker of 2 threads;
Ray with 2 workers of 1 thread each. Each is timed ``ray_repeats`` times on the same
``ray_samples`` seed rows and the best time counts; the workers' start-up (a process each, a
model load each) is reported apart, because a round pays it once per pass, not per sample.
The overhead at equal cores is ``ray seconds / one-process seconds - 1``.

The table for N GPUs is DERIVED, not measured: N x the measured samples/s of one replica,
discounted by the overhead measured here. It assumes one replica per GPU and a pass that is
long enough for the start-up not to matter.
"""

from __future__ import annotations

import os
import time

import numpy as np

from benchmarks.common import load_seed_rows, log, prompts_responses


def run(settings, models) -> dict:
    try:
        import ray
    except ImportError:
        return {"skipped": True, "reason": "ray is not installed (pip install -e '.[ray]')"}
    import torch

    from middo_pipeline.core.distributed import RayForward, RaySettings
    from middo_pipeline.core.forward import score_samples

    lm = models.get()
    rows = load_seed_rows()[: settings.ray_samples]
    prompts, responses = prompts_responses(rows)
    n = len(prompts)
    kw = dict(max_length=settings.max_length, with_embeddings=True)
    cores = settings.ray_cpus
    torch.set_num_threads(cores)
    score_samples(lm.model, lm.tokenizer, prompts[:4], responses[:4], **kw)  # warm-up
    single = []
    for _ in range(settings.ray_repeats):
        t0 = time.perf_counter()
        ref = score_samples(lm.model, lm.tokenizer, prompts, responses, **kw)
        single.append(time.perf_counter() - t0)
    best_single = min(single)
    log(f"ray: one process, {cores} threads: {n} samples in {best_single:.2f}s ({n / best_single:.1f} samples/s)")
    out = {
        "samples": n,
        "cores": cores,
        "one_process": {"seconds": best_single, "samples_per_second": n / best_single, "threads": cores},
        "ray": {},
    }
    path = models.path
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        for workers in (1, 2):
            per = cores / workers
            t0 = time.perf_counter()
            st = RaySettings(workers=workers, num_cpus=per, shards_per_worker=settings.ray_shards_per_worker)
            with RayForward(path, st, {"device": "cpu", "threads": int(per)}) as pool:
                start = time.perf_counter() - t0
                pool.score_samples(prompts[:4], responses[:4], **kw)  # warm-up on every worker path
                times, res = [], None
                for _ in range(settings.ray_repeats):
                    t1 = time.perf_counter()
                    res = pool.score_samples(prompts, responses, **kw)
                    times.append(time.perf_counter() - t1)
            best = min(times)
            diff = float(np.nanmax(np.abs(res.loss - ref.loss)))
            emb_diff = float(np.abs(res.embedding - ref.embedding).max())
            out["ray"][f"{workers}_workers"] = {
                "workers": workers,
                "threads_per_worker": int(per),
                "seconds": best,
                "samples_per_second": n / best,
                "overhead_vs_one_process": best / best_single - 1.0,
                "startup_seconds": start,
                "max_abs_loss_diff": diff,
                "max_abs_embedding_diff": emb_diff,
            }
            log(
                f"ray: {workers} worker(s) x {int(per)} thread(s): {best:.2f}s ({n / best:.1f} samples/s), "
                f"overhead {best / best_single - 1:+.0%}, start-up {start:.1f}s, max |loss diff| {diff:.1e}"
            )
    finally:
        ray.shutdown()
    best_ray = min(out["ray"].values(), key=lambda r: r["seconds"])
    out["ray_overhead_at_equal_cores"] = best_ray["overhead_vs_one_process"]
    per_replica = n / best_single  # one replica of this machine's cores
    eff = 1.0 / (1.0 + max(best_ray["overhead_vs_one_process"], 0.0))
    out["per_sample_seconds"] = best_single / n
    out["derived_for_n_replicas"] = {
        "note": "DERIVED, not measured: N x one replica's measured samples/s x (1 / (1 + overhead)); "
        "a replica here is this machine's CPU cores, on a cluster one GPU",
        "rows": [
            {
                "replicas": k,
                "samples_per_second": per_replica * k * eff,
                "seconds_per_100k": 1e5 / (per_replica * k * eff),
            }
            for k in (1, 2, 4, 8, 16)
        ],
    }
    return out
