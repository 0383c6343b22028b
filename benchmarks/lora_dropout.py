"""LoRA dropout 0.05 (the default before 2026-12-04) against 0 (peft's default, ours since):
the downstream benchmark's training (1 epoch, batch 8, max_length 384) on the seed data of a
finished round, each training seed both ways, evaluated on the 240-item held-out set; paired
per item, with the interval that resamples training runs as well as items; and the training
seconds of each run. Runs are kept in the downstream run cache, so both benchmarks reuse them.

    PYTHONPATH=. python -m benchmarks.lora_dropout --from MIDDO_HOME --seeds 0,1,2,3,4 \\
        --out benchmarks/results/lora_dropout.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    import polars as pl

    from benchmarks.common import Settings, log, write_json_atomic
    from benchmarks.downstream import DOWN_EVAL, runs_items, train_and_evaluate, train_config
    from middo_pipeline.core.evaluation import load_eval_set
    from middo_pipeline.core.storage import Storage

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="home", required=True, help="MIDDO_HOME of a finished round 1 (its seed data)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    settings = Settings.quick()
    df = pl.read_parquet(Storage(args.home).table_path("round_dataset", "round-1"))
    eval_df = load_eval_set(DOWN_EVAL)
    seeds = [int(s) for s in args.seeds.split(",")]
    ways = {"dropout_0.05": 0.05, "dropout_0": 0.0}
    runs: dict[str, dict] = {w: {"correct": [], "loss": [], "records": []} for w in ways}
    t0 = time.perf_counter()
    for s in seeds:
        for way, p_drop in ways.items():
            cfg = train_config(settings, s, lora_dropout=p_drop)
            with tempfile.TemporaryDirectory(prefix="middo-bench-dropout-") as tmp:
                correct, loss, rec, cached = train_and_evaluate(settings, df, cfg, eval_df, Path(tmp) / "m")
            runs[way]["correct"].append(correct)
            runs[way]["loss"].append(loss)
            runs[way]["records"].append({"seed": s, "reused": bool(cached), **rec})
            log(
                f"lora dropout {p_drop}: seed {s}: MC {rec['mc_accuracy']:.3f}, loss {rec['mean_response_loss']:.4f}"
                + (f" (reused {cached})" if cached else f", trained in {rec['train_seconds']:.0f} s")
            )
    a, b = runs["dropout_0"], runs["dropout_0.05"]
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "from": args.home,
        "seeds": seeds,
        "eval_items": int(len(a["correct"][0])),
        "mc_dropout0_minus_005": runs_items(a["correct"], b["correct"]),
        "loss_005_minus_dropout0": runs_items(b["loss"], a["loss"]),  # > 0: dropout 0 has the lower loss
        "runs": {w: r["records"] for w, r in runs.items()},
        "seconds": time.perf_counter() - t0,
    }
    m, lo = out["mc_dropout0_minus_005"], out["loss_005_minus_dropout0"]
    print(
        f"MC, dropout 0 - 0.05: {m['mean']:+.4f} [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}] (runs+items); "
        f"loss, 0.05 - 0: {lo['mean']:+.4f} [{lo['ci95'][0]:+.4f}, {lo['ci95'][1]:+.4f}]"
    )
    if args.out:
        write_json_atomic(Path(args.out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
