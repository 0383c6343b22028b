"""The canonical sample table and its provenance columns.

Every dataset the pipeline writes (seed, round inputs, optimized outputs) has exactly these
columns, in this order. ``sample_id`` is a content hash of the normalized text, so the same
sample gets the same id in every round and on every machine.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable

import polars as pl

# operations recorded in the ``operation`` column
SEED = "seed"
KEPT = "kept"
SIMPLIFIED = "simplified"
REWRITTEN = "rewritten"
EXTENDED = "extended"
OPERATIONS = (SEED, KEPT, SIMPLIFIED, REWRITTEN, EXTENDED)

SAMPLE_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String,
    "instruction": pl.String,
    "input": pl.String,
    "output": pl.String,
    "round": pl.Int64,
    "origin_id": pl.String,
    "operation": pl.String,
}

# rows that could not be used: kept aside with the reason, never dropped silently
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source_file": pl.String,
    "location": pl.String,  # "line 12" or "record 7" (1-based)
    "field": pl.String,
    "reason": pl.String,
    "raw": pl.String,  # the offending record, truncated for display
}


def normalize_text(text: str) -> str:
    """Unicode NFC, unix newlines, stripped ends. Inner whitespace is meaningful (code)."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip()


def make_sample_id(instruction: str, input: str, output: str) -> str:
    """Stable 16-hex-digit id from the normalized (instruction, input, output)."""
    payload = json.dumps(
        [normalize_text(instruction), normalize_text(input or ""), normalize_text(output)],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def prompt_text(instruction: str, input: str | None) -> str:
    """The user turn: the instruction, then the input after a blank line when there is one."""
    instruction = instruction.strip()
    input = (input or "").strip()
    return f"{instruction}\n\n{input}" if input else instruction


def make_samples(
    rows: Iterable[dict],
    *,
    round_number: int = 0,
    operation: str = SEED,
    origin_id: str | None = None,
) -> pl.DataFrame:
    """Build a canonical table from dicts with instruction/input/output (other keys ignored
    unless they are provenance columns, which then win over the keyword defaults)."""
    out = []
    for row in rows:
        ins = normalize_text(row["instruction"])
        inp = normalize_text(row.get("input") or "")
        outp = normalize_text(row["output"])
        out.append(
            {
                "sample_id": row.get("sample_id") or make_sample_id(ins, inp, outp),
                "instruction": ins,
                "input": inp,
                "output": outp,
                "round": row.get("round", round_number),
                "origin_id": row.get("origin_id", origin_id),
                "operation": row.get("operation", operation),
            }
        )
    return pl.DataFrame(out, schema=SAMPLE_SCHEMA)


def empty_samples() -> pl.DataFrame:
    return pl.DataFrame(schema=SAMPLE_SCHEMA)


def empty_quarantine() -> pl.DataFrame:
    return pl.DataFrame(schema=QUARANTINE_SCHEMA)


def schema_problems(df: pl.DataFrame) -> list[str]:
    """What is wrong with a table that claims to be a canonical sample table (empty = fine)."""
    problems = []
    for name, dtype in SAMPLE_SCHEMA.items():
        if name not in df.columns:
            problems.append(f"missing column {name!r}")
        elif df.schema[name] != dtype:
            problems.append(f"column {name!r} has type {df.schema[name]}, expected {dtype}")
    if problems:
        return problems
    for name in ("sample_id", "instruction", "output", "operation"):
        n = df.filter(pl.col(name).is_null() | (pl.col(name).str.strip_chars() == "")).height
        if n:
            problems.append(f"{n} rows with blank {name!r}")
    dup = df.height - df["sample_id"].n_unique()
    if dup:
        problems.append(f"{dup} duplicate sample_id values")
    bad_ops = df.filter(~pl.col("operation").is_in(list(OPERATIONS))).height
    if bad_ops:
        problems.append(f"{bad_ops} rows with an unknown operation")
    orphan = df.filter(
        (pl.col("operation") != SEED) & (pl.col("operation") != KEPT) & pl.col("origin_id").is_null()
    ).height
    if orphan:
        problems.append(f"{orphan} derived rows without origin_id")
    return problems


def fingerprint(df: pl.DataFrame) -> str:
    """Content hash of a sample table: its ordered sample ids (ids hash the text)."""
    h = hashlib.sha256()
    for sid in df["sample_id"].to_list():
        h.update(sid.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()[:16]
