"""Write a sample table for training tools: Alpaca / LLaMA-Factory JSON(L), chat ``messages``, or Parquet.

Every exported row carries its provenance (sample_id, round, origin_id, operation), so a
trained model's data can be traced back through the rounds.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import polars as pl

from middo_pipeline.core.schema import prompt_text

FORMATS = ("jsonl", "json", "parquet")
LAYOUTS = ("alpaca", "messages")
PROVENANCE = ("sample_id", "round", "origin_id", "operation")


def to_records(df: pl.DataFrame, layout: str = "alpaca") -> list[dict]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    records = []
    for row in df.iter_rows(named=True):
        prov = {k: row[k] for k in PROVENANCE}
        if layout == "alpaca":
            records.append({"instruction": row["instruction"], "input": row["input"], "output": row["output"], **prov})
        else:
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt_text(row["instruction"], row["input"])},
                        {"role": "assistant", "content": row["output"]},
                    ],
                    **prov,
                }
            )
    return records


def export_table(df: pl.DataFrame, out: str | Path, fmt: str = "jsonl", layout: str = "alpaca") -> Path:
    """Write atomically to ``out``; returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if fmt == "parquet":
            if layout == "alpaca":
                df.select("instruction", "input", "output", *PROVENANCE).write_parquet(tmp)
            else:
                pl.DataFrame(to_records(df, layout)).write_parquet(tmp)
        else:
            records = to_records(df, layout)
            with open(tmp, "w", encoding="utf-8") as fh:
                if fmt == "json":
                    json.dump(records, fh, ensure_ascii=False, indent=1)
                else:
                    for rec in records:
                        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
