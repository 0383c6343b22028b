"""Seed ingestion at scale: peak memory and time of ``read_seed`` on 1M small rows.

Each measurement runs in a fresh Python process (so memory freed by earlier sections cannot
hide growth): the baseline is the process's RSS after the imports, the peak is sampled by
``PeakRSS`` while ``read_seed`` runs. Reported beside it: the size of the resulting sample table
written as Parquet, and the issue's goal (peak <= 3x that size plus a constant).

    python -m benchmarks.ingest [--rows N] [--formats jsonl,parquet]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, os, sys, time
from benchmarks.common import PeakRSS
from middo_pipeline.core.ingest import read_seed
import polars as pl

path, table = sys.argv[1], sys.argv[2]
with PeakRSS() as peak:
    t0 = time.perf_counter()
    result = read_seed(path)
    seconds = time.perf_counter() - t0
result.samples.write_parquet(table)
print(json.dumps({"seconds": seconds, "peak_bytes": peak.delta, "rows": result.usable,
                  "rejected": result.rejected, "table_bytes": os.path.getsize(table)}))
"""


def write_rows(path: Path, rows: int, fmt: str) -> Path:
    """``rows`` small distinct Alpaca records (about 60 bytes each as JSON Lines)."""
    if fmt == "parquet":
        import polars as pl

        n = pl.int_range(0, rows, eager=True)
        pl.DataFrame(
            {"instruction": "Add " + n.cast(pl.String) + " and 1.", "input": "", "output": (n + 1).cast(pl.String)}
        ).write_parquet(path)
        return path
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(json.dumps({"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}) + "\n")
    return path


def measure(rows: int, fmt: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="middo-ingest-bench-") as tmp:
        src = write_rows(Path(tmp) / f"seed.{fmt}", rows, fmt)
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, str(src), str(Path(tmp) / "table.parquet")],
            capture_output=True,
            text=True,
            check=True,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        out = json.loads(res.stdout.strip().splitlines()[-1])
        out["file_bytes"] = src.stat().st_size
    mib = 2**20
    out["peak_mib"] = out["peak_bytes"] / mib
    out["table_mib"] = out["table_bytes"] / mib
    out["peak_over_table"] = out["peak_bytes"] / max(out["table_bytes"], 1)
    return out


def run(settings=None, rows: int = 1_000_000, formats: tuple[str, ...] = ("jsonl",)) -> dict:
    by_format = {fmt: measure(rows, fmt) for fmt in formats}
    first = by_format[formats[0]]
    suffix = "1m" if rows == 1_000_000 else str(rows)
    return {
        f"ingest_peak_mib_{suffix}": first["peak_mib"],
        f"ingest_seconds_{suffix}": first["seconds"],
        "rows": rows,
        "goal": "peak <= 3x the resulting Parquet table + a constant",
        "formats": by_format,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--formats", default="jsonl", help="comma-separated: jsonl, parquet")
    args = p.parse_args(argv)
    print(json.dumps(run(rows=args.rows, formats=tuple(args.formats.split(","))), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
