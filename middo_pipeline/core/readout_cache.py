"""Base-model readouts kept across rounds.

"Before training" is always the base model (the paper's "before"; ``init: previous`` does not
change it), and so is the prompt-free loss of the quality reading (IFD). Both depend only on
the base model, the sample's prompt and response, and ``max_length``: a sample that a round
keeps unchanged would be scored again, identically, every round. This cache keeps them per
sample so that a round scores only the samples it has not seen (on the default the kept rows
are most of a round: the readouts' two base-model passes then cost seconds instead of a
minute).

A row is keyed by sha256 of (prompt, response, max_length); a file per base model identity
(``model_identity``: its name, where it was loaded from, the size and modification time of
each file of a local model folder, and the load settings), so a model replaced in place, or
loaded on another device or dtype, gets a new file. Values computed in another batch can
differ from a fresh pass by float rounding (the batch shapes differ), as the Ray path's do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from middo_pipeline.atomic import atomic_path

log = logging.getLogger(__name__)

VALUES = ("loss_before", "loss_unconditional")
COLUMNS = ("key", *VALUES)
SCHEMA = {"key": pl.String, "loss_before": pl.Float32, "loss_unconditional": pl.Float32}


def model_identity(name: str, resolved: str, load_settings: dict | None = None) -> str:
    """A short hash that changes when the base model's files, or how it is loaded, change."""
    parts: dict = {"name": name, "resolved": resolved, "load": load_settings or {}}
    folder = Path(resolved)
    if folder.is_dir():
        parts["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()
        )
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def row_keys(prompts: Sequence[str], responses: Sequence[str | None], max_length: int) -> list[str]:
    return [
        hashlib.sha256(json.dumps([p, r, int(max_length)]).encode()).hexdigest()
        for p, r in zip(prompts, responses, strict=True)
    ]


class BaseReadoutCache:
    """``lookup`` the cached rows of a round, ``add`` the ones it computed. One Parquet file per
    model identity; written atomically (a crash leaves the old file)."""

    def __init__(self, folder: Path, identity: str):
        self.path = Path(folder) / f"{identity}.parquet"

    def _read(self) -> pl.DataFrame:
        if not self.path.exists():
            return pl.DataFrame(schema=SCHEMA)
        try:
            return pl.read_parquet(self.path).select(list(COLUMNS)).cast(SCHEMA)
        except Exception as exc:  # a damaged cache is recomputed, never trusted
            log.warning("base readout cache %s unreadable (%s): scoring every sample", self.path, exc)
            return pl.DataFrame(schema=SCHEMA)

    def lookup(self, keys: Sequence[str]) -> dict[str, dict]:
        table = self._read()
        if table.height == 0:
            return {}
        hits = table.filter(pl.col("key").is_in(list(set(keys)))).unique("key", keep="last")
        return {row["key"]: row for row in hits.iter_rows(named=True)}

    def add(self, rows: pl.DataFrame) -> None:
        if rows.height == 0:
            return
        table = pl.concat([self._read(), rows.select(list(COLUMNS)).cast(SCHEMA)]).unique("key", keep="last")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            table.write_parquet(tmp)


def split_hits(keys: Sequence[str], hits: dict[str, dict]) -> tuple[list[int], list[int]]:
    """(indices found in the cache, indices to score), in row order."""
    found = [i for i, k in enumerate(keys) if k in hits]
    missing = [i for i, k in enumerate(keys) if k not in hits]
    return found, missing


def assemble(
    keys: Sequence[str], hits: dict[str, dict], missing: Sequence[int], computed: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], pl.DataFrame]:
    """Every row's base readouts in row order (cached, or just computed) and the new cache rows.
    ``computed[col]`` holds the values of the ``missing`` rows, in their order."""
    n = len(keys)
    out = {col: np.full(n, np.nan, dtype=np.float32) for col in VALUES}
    for i, k in enumerate(keys):
        h = hits.get(k)
        if h is not None:
            for col in VALUES:
                out[col][i] = np.nan if h[col] is None else h[col]
    miss = np.asarray(missing, dtype=np.int64)
    if miss.size:
        for col in VALUES:
            out[col][miss] = np.asarray(computed[col], dtype=np.float32)
    new = pl.DataFrame({"key": [keys[i] for i in missing], **{c: out[c][miss] for c in VALUES}}, schema=SCHEMA)
    return out, new
