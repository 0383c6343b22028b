"""Downstream: train on the seed data and on the round-2 optimized dataset with the same compute,
evaluate both on the held-out set.

1. Two Middo rounds run for real through the Dagster loop (``loop.run_rounds``) in a
   throw-away instance (temporary ``DAGSTER_HOME`` / ``MIDDO_HOME``), default model, local
   optimizer; the round-2 ``optimized_dataset`` table is read from storage. With
   ``--downstream-from MIDDO_HOME`` the tables of a loop that already ran (e.g. the demo's
   ``.dagster_home/middo``) are used instead.
2. For each seed: a LoRA fine-tune of the default model on the seed data and one on the
   optimized data, both with the same number of optimizer steps, batch size and max length
   (equal samples seen; token counts differ a little and are reported), then
   ``evaluation.evaluate`` on ``data/eval_heldout.jsonl``: multiple-choice accuracy and mean
   response loss.
3. Mean ± standard deviation over the seeds of each and of the paired difference.

With the 135M default model on a CPU and a few hundred samples this is a small-scale check,
not a replication of the paper's 8-benchmark gains.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import EVAL_PATH, SEED_PATH, log


def _round2_dataset(settings, workdir: Path):
    import polars as pl

    from middo_pipeline.core.storage import Storage
    from middo_pipeline.loop import run_rounds

    home = workdir / "dagster_home"
    middo_home = workdir / "middo"
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    env = dict(os.environ)
    env.update({"MIDDO_HOME": str(middo_home), "MIDDO_DEVICE": settings.device, "MIDDO_PROFILE": "default",
                "MIDDO_BASE_MODEL": settings.model, "MIDDO_OPTIMIZER_MODEL": settings.model,
                "MIDDO_OPTIMIZER_BACKEND": "local"})
    config = {"ops": {
        "sft_checkpoint": {"config": {"max_steps": settings.down_round_steps, "max_length": 384,
                                      "batch_size": 4, "seed": settings.seed}},
        "embedding_signals": {"config": {"umap": False}},
    }}
    t0 = time.perf_counter()
    try:
        summaries = run_rounds(2, seed_path=str(SEED_PATH), config=config, env=env, log=lambda m: log(f"downstream: {m}"))
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old
    seconds = time.perf_counter() - t0
    store = Storage(middo_home)
    seed_df = pl.read_parquet(store.table_path("seed_dataset"))
    opt_df = pl.read_parquet(store.table_path("optimized_dataset", "round-2"))
    return seed_df, opt_df, {"seconds": seconds, "rounds": [s.metadata for s in summaries]}


def _finished_round2(middo_home: Path):
    """The seed and round-2 optimized tables of a loop that already ran (``--downstream-from``)."""
    import polars as pl

    from middo_pipeline.core.storage import Storage

    store = Storage(middo_home)
    paths = [store.table_path("seed_dataset"), store.table_path("optimized_dataset", "round-2")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"--downstream-from {middo_home}: no finished round 2 there (missing {', '.join(missing)})")
    log(f"downstream: reusing the round-2 optimized dataset of {middo_home}")
    return pl.read_parquet(paths[0]), pl.read_parquet(paths[1]), {"reused_from": str(middo_home)}


def _ops(df) -> dict:
    if "operation" not in df.columns:
        return {}
    return {str(k): int(v) for k, v in zip(*np.unique(np.asarray(df["operation"].to_list()), return_counts=True))}


def run(settings, models=None) -> dict:
    from middo_pipeline.core.evaluation import evaluate, load_eval_set
    from middo_pipeline.core.training import TrainConfig, train_sft
    from middo_pipeline.models.loading import load_model

    if not EVAL_PATH.exists():
        return {"skipped": True, "reason": f"{EVAL_PATH} not found"}
    eval_df = load_eval_set(EVAL_PATH)
    with tempfile.TemporaryDirectory(prefix="middo-bench-down-") as tmp:
        tmp = Path(tmp)
        if settings.down_from:
            seed_df, opt_df, loop_info = _finished_round2(Path(settings.down_from))
        else:
            log("downstream: two Middo rounds through the Dagster loop")
            seed_df, opt_df, loop_info = _round2_dataset(settings, tmp)
        log(f"downstream: seed {seed_df.height} rows, round-2 optimized {opt_df.height} rows")
        results = {"seed": [], "optimized": []}
        tokens = {"seed": [], "optimized": []}
        for s in settings.down_seeds:
            for name, df in (("seed", seed_df), ("optimized", opt_df)):
                cfg = TrainConfig(max_steps=settings.down_steps, batch_size=4, max_length=384, seed=s,
                                  device=settings.device, threads=settings.threads)
                out = tmp / f"{name}-{s}"
                tr = train_sft(settings.model, df, out, cfg)
                lm = load_model(str(out), device=settings.device, dtype="auto", threads=settings.threads)
                ev = evaluate(lm.model, lm.tokenizer, eval_df, max_length=384)
                del lm
                results[name].append({"seed": s, "mc_accuracy": ev["mc_accuracy"],
                                      "mean_response_loss": ev["mean_response_loss"], "train_tokens": tr.tokens_seen})
                tokens[name].append(tr.tokens_seen)
                log(f"downstream: {name} seed {s}: mc_accuracy {ev['mc_accuracy']:.3f}, "
                    f"loss {ev['mean_response_loss']:.3f}")

    def stat(name: str, key: str) -> dict:
        v = np.asarray([r[key] for r in results[name]], dtype=np.float64)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}

    def diff(key: str) -> dict:
        a = np.asarray([r[key] for r in results["optimized"]], dtype=np.float64)
        b = np.asarray([r[key] for r in results["seed"]], dtype=np.float64)
        d = a - b
        return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "values": d.tolist()}

    return {
        "skipped": False,
        "eval_items": eval_df.height,
        "seed_rows": seed_df.height,
        "optimized_rows": opt_df.height,
        "optimized_operations": _ops(opt_df),
        "steps": settings.down_steps,
        "batch_size": 4,
        "seeds": list(settings.down_seeds),
        "loop": loop_info,
        "seed_trained": {"mc_accuracy": stat("seed", "mc_accuracy"), "mean_response_loss": stat("seed", "mean_response_loss")},
        "optimized_trained": {"mc_accuracy": stat("optimized", "mc_accuracy"),
                              "mean_response_loss": stat("optimized", "mean_response_loss")},
        "difference_optimized_minus_seed": {"mc_accuracy": diff("mc_accuracy"),
                                            "mean_response_loss": diff("mean_response_loss")},
        "train_tokens": tokens,
        "runs": results,
        "note": "small scale: 135M model, LoRA, a few hundred samples, a held-out set of a few hundred items",
    }
