"""Validation: each record's fields checked, normalized and turned into a canonical sample, or
quarantined with the first problem found."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from pathlib import Path

import polars as pl

from middo_pipeline.core.ingest.base import (
    BLANK,
    DUPLICATE,
    EMPTY_CONVERSATION,
    INVALID_TEXT,
    MISSING_FIELD,
    NO_ASSISTANT_REPLY,
    NO_GPT_REPLY,
    NO_HUMAN_FIRST,
    NO_USER_FIRST,
    NOT_AN_OBJECT,
    RECORD_FIELD,
    TOO_LONG,
    WRONG_TYPE,
    IngestResult,
    Reject,
    clip,
    json_type,
    short,
)
from middo_pipeline.core.ingest.readers import Loaded
from middo_pipeline.core.schema import (
    QUARANTINE_SCHEMA,
    SAMPLE_SCHEMA,
    SEED,
    make_sample_id,
    normalize_text,
)

# characters that render as nothing although Unicode files them as letters or symbols
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u180e")


def _visible(c: str) -> bool:
    """Not whitespace, not a control/format/unassigned code point (zero-width space, joiners, BOM,
    bidi marks, tags, soft hyphen), not a combining mark alone, not a blank filler."""
    category = unicodedata.category(c)
    return category[0] not in "ZCM" and c not in _FILLERS


def _text(obj: dict, key: str, field: str | None = None, *, required: bool = True) -> str:
    field = field or key
    if key not in obj:
        if required:
            raise Reject(field, MISSING_FIELD)
        return ""
    value = obj[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise Reject(field, f"{WRONG_TYPE}: expected a string, found {json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Reject(
            field, f"{INVALID_TEXT}: lone surrogate U+{ord(value[e.start]):04X} at character {e.start + 1}"
        ) from None
    if required and not normalize_text(value):
        raise Reject(field, f"{BLANK}: empty after stripping whitespace")
    if required and not any(_visible(c) for c in value):
        shown = " ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(value))
        raise Reject(field, f"{BLANK}: only invisible characters ({clip(shown, 60)})")
    return value


def _alpaca(obj: dict) -> tuple[str, str, str, bool]:
    return _text(obj, "instruction"), _text(obj, "input", required=False), _text(obj, "output"), False


def _conversation_reader(
    key: str,
    speaker: str,
    content: str,
    prompts: set[str],
    replies: set[str],
    skip: set[str],
    no_first: str,
    no_reply: str,
    prompt_name: str,
    reply_name: str,
) -> Callable[[dict], tuple[str, str, str, bool]]:
    def read(obj: dict) -> tuple[str, str, str, bool]:
        if key not in obj:
            raise Reject(key, MISSING_FIELD)
        turns = obj[key]
        if not isinstance(turns, list):
            raise Reject(key, f"{WRONG_TYPE}: expected an array, found {json_type(turns)}")
        if not turns:
            raise Reject(key, f"{EMPTY_CONVERSATION}: no turns")

        def who(i: int) -> str:
            turn = turns[i]
            if not isinstance(turn, dict):
                raise Reject(f"{key}[{i}]", f"{WRONG_TYPE}: expected an object, found {json_type(turn)}")
            return _text(turn, speaker, f"{key}[{i}].{speaker}").strip().lower()

        i = 0
        while i < len(turns) and who(i) in skip:
            i += 1
        if i == len(turns):
            raise Reject(key, f"{no_first}: only {'/'.join(sorted(skip))} turns")
        first = who(i)
        if first not in prompts:
            raise Reject(f"{key}[{i}].{speaker}", f"{no_first}: first turn is {short(turns[i][speaker])}")
        j = i + 1
        if j == len(turns):
            raise Reject(key, f"{no_reply}: the conversation ends after the {prompt_name} turn")
        second = who(j)
        if second not in replies:
            raise Reject(
                f"{key}[{j}].{speaker}",
                f"{no_reply}: the {prompt_name} turn is followed by {short(turns[j][speaker])}, not {reply_name}",
            )
        instruction = _text(turns[i], content, f"{key}[{i}].{content}")
        output = _text(turns[j], content, f"{key}[{j}].{content}")
        return instruction, "", output, len(turns) > j + 1

    return read


_EXTRACTORS: dict[str, Callable[[dict], tuple[str, str, str, bool]]] = {
    "alpaca": _alpaca,
    "sharegpt": _conversation_reader(
        "conversations",
        "from",
        "value",
        {"human", "user"},
        {"gpt", "assistant"},
        {"system"},
        NO_HUMAN_FIRST,
        NO_GPT_REPLY,
        "human",
        "gpt",
    ),
    "messages": _conversation_reader(
        "messages",
        "role",
        "content",
        {"user"},
        {"assistant"},
        {"system", "developer"},
        NO_USER_FIRST,
        NO_ASSISTANT_REPLY,
        "user",
        "assistant",
    ),
}


_CHUNK = 50_000  # accepted rows turned into a columnar chunk at a time
_CHUNK_SCHEMA = {
    "sample_id": pl.String,
    "instruction": pl.String,
    "input": pl.String,
    "output": pl.String,
    "_n": pl.Int64,
    "_location": pl.String,
    "_truncated": pl.Boolean,
}


def _chunk(cols: dict[str, list]) -> pl.DataFrame:
    """Accepted rows (already normalized, with their ids) as a canonical seed table, plus the
    bookkeeping columns _n, _location, _truncated (built column-wise: no dict per row)."""
    df = pl.DataFrame(cols, schema=_CHUNK_SCHEMA)
    extra = {
        "round": pl.lit(0, SAMPLE_SCHEMA["round"]),
        "origin_id": pl.lit(None, SAMPLE_SCHEMA["origin_id"]),
        "operation": pl.lit(SEED, SAMPLE_SCHEMA["operation"]),
    }
    return df.with_columns(**extra).select(*SAMPLE_SCHEMA, "_n", "_location", "_truncated")


def ingest(path: Path, loaded: Loaded, max_chars: int) -> IngestResult:
    """Validate the records one at a time. Accepted rows go into columnar chunks every _CHUNK
    rows, so memory grows with the table, not with Python objects per record; duplicates are
    found on the sample-id column at the end, and their raw text is read again (a third pass over
    the records, only when there are duplicates)."""
    extract = _EXTRACTORS[loaded.flavor]
    source = str(path)
    cols: dict[str, list] = {name: [] for name in _CHUNK_SCHEMA}
    chunks: list[pl.DataFrame] = []
    rejected: list[dict] = []  # with "_n", the record's position, to merge duplicates in file order
    total = 0

    def flush() -> None:
        if cols["sample_id"]:
            chunks.append(_chunk(cols))
            for values in cols.values():
                values.clear()

    for n, rec in enumerate(loaded.records()):
        total += 1
        try:
            if rec.problem is not None:
                raise Reject(*rec.problem)
            if not isinstance(rec.value, dict):
                raise Reject(RECORD_FIELD, f"{NOT_AN_OBJECT}: found {json_type(rec.value)}")
            instruction, input, output, was_truncated = extract(rec.value)
            instruction, input, output = map(normalize_text, (instruction, input, output))
            n_chars = len(instruction) + len(input) + len(output)
            if n_chars > max_chars:
                raise Reject(RECORD_FIELD, f"{TOO_LONG}: {n_chars} characters (limit {max_chars})")
        except Reject as r:
            rejected.append(
                {
                    "source_file": source,
                    "location": rec.location,
                    "field": r.field,
                    "reason": clip(r.reason),
                    "raw": rec.raw,
                    "_n": n,
                }
            )
            continue
        for name, value in zip(
            _CHUNK_SCHEMA,
            (make_sample_id(instruction, input, output), instruction, input, output, n, rec.location, was_truncated),
        ):
            cols[name].append(value)
        if len(cols["sample_id"]) >= _CHUNK:
            flush()
    flush()
    # chunks stay chunks (no rechunk copy): Parquet writes them as they are
    kept = pl.concat(chunks, rechunk=False) if chunks else _chunk(cols)
    chunks.clear()
    first = kept["sample_id"].is_first_distinct()
    if not first.all():
        kept, rejected = _move_duplicates(kept, first, rejected, loaded, source)
    quarantine = pl.DataFrame(rejected, schema={**QUARANTINE_SCHEMA, "_n": pl.Int64}).sort("_n").drop("_n")
    return IngestResult(
        samples=kept.drop("_n", "_location", "_truncated"),
        quarantine=quarantine,
        format=loaded.format,
        total_records=total,
        source_file=source,
        truncated_conversations=int(kept["_truncated"].sum() or 0),
    )


def _move_duplicates(
    kept: pl.DataFrame, first: pl.Series, rejected: list[dict], loaded: Loaded, source: str
) -> tuple[pl.DataFrame, list[dict]]:
    """Rows whose content came earlier: into the quarantine, naming where it came first."""
    firsts = kept.filter(first).select("sample_id", pl.col("_location").alias("_first"))
    dups = kept.filter(~first).select("sample_id", "_n", "_location").join(firsts, on="sample_id", how="left")
    wanted = dict(zip(dups["_n"].to_list(), zip(dups["_location"].to_list(), dups["_first"].to_list())))
    for n, rec in enumerate(loaded.records()):  # the raw text of the duplicates only
        if n in wanted:
            location, first_location = wanted[n]
            rejected.append(
                {
                    "source_file": source,
                    "location": location,
                    "field": RECORD_FIELD,
                    "reason": clip(f"{DUPLICATE}: same content as {first_location}"),
                    "raw": rec.raw,
                    "_n": n,
                }
            )
    return kept.filter(first), rejected
