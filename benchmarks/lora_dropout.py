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
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _run(settings, df, cfg, eval_df) -> tuple[np.ndarray, np.ndarray, dict]:
    from benchmarks.downstream import DOWN_EVAL, _run_cache_file
    from middo_pipeline.core.evaluation import evaluate
    from middo_pipeline.core.training import train_sft
    from middo_pipeline.models.loading import load_model

    cache_file = _run_cache_file(settings, df, cfg, DOWN_EVAL)
    if cache_file is not None and cache_file.exists():
        hit = np.load(cache_file, allow_pickle=False)
        return hit["correct"], hit["loss"], {**json.loads(str(hit["record"])), "cached": True}
    with tempfile.TemporaryDirectory(prefix="middo-bench-dropout-") as tmp:
        tr = train_sft(settings.model, df, Path(tmp) / "m", cfg)
        lm = load_model(str(Path(tmp) / "m"), device=settings.device, dtype="auto", threads=settings.threads)
        ev = evaluate(lm.model, lm.tokenizer, eval_df, max_length=384)
    items = ev["items"].sort("id") if "id" in ev["items"].columns else ev["items"]
    correct, loss = items["correct"].cast(float).to_numpy(), items["loss"].cast(float).to_numpy()
    rec = {
        "steps": tr.steps,
        "rows": df.height,
        "train_tokens": tr.tokens_seen,
        "train_seconds": tr.seconds,
        "mc_accuracy": ev["mc_accuracy"],
        "mean_response_loss": ev["mean_response_loss"],
    }
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp_file, correct=correct, loss=loss, record=json.dumps(rec))
        tmp_file.replace(cache_file)
    return correct, loss, {**rec, "cached": False}


def main(argv=None) -> int:
    import polars as pl

    from benchmarks.common import Settings, log, write_json_atomic
    from benchmarks.downstream import DOWN_EVAL, runs_items
    from middo_pipeline.core.evaluation import load_eval_set
    from middo_pipeline.core.storage import Storage
    from middo_pipeline.core.training import TrainConfig

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
            cfg = dataclasses.replace(
                TrainConfig(
                    epochs=1.0,
                    max_steps=-1,
                    batch_size=8,
                    max_length=384,
                    seed=s,
                    device=settings.device,
                    threads=settings.threads,
                    logging_steps=10,
                ),
                lora_dropout=p_drop,
            )
            correct, loss, rec = _run(settings, df, cfg, eval_df)
            runs[way]["correct"].append(correct)
            runs[way]["loss"].append(loss)
            runs[way]["records"].append({"seed": s, **rec})
            log(
                f"lora dropout {p_drop}: seed {s}: MC {rec['mc_accuracy']:.3f}, loss {rec['mean_response_loss']:.4f}"
                + (" (cached run)" if rec["cached"] else f", trained in {rec['train_seconds']:.0f} s")
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
