"""Format detection and readers: which format a seed file is (from its content, never its name),
and its records, read by the decoder that fits (JSON array, JSON Lines, Parquet)."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from middo_pipeline.core.ingest.base import (
    FORMATS,
    NOT_AN_OBJECT,
    Record,
    SeedFileError,
    clip,
    dump,
    json_type,
    short,
)
from middo_pipeline.core.ingest.decode import (
    BOM,
    array_records,
    jsonl_records,
    read_bytes,
)


@dataclass
class Loaded:
    format: str
    flavor: str  # "alpaca", "sharegpt", "messages"
    records: Callable[[], Iterator[Record]]  # each call yields the records again, one at a time


HEAD_BYTES = 1 << 20  # what is read to tell the format; JSON Lines are then read line by line


def load(path: Path, format: str | None) -> Loaded:
    if format is not None and format not in FORMATS:
        raise SeedFileError(path, f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    head = read_bytes(path, limit=HEAD_BYTES + 1)
    whole = len(head) <= HEAD_BYTES  # the head is the whole file
    if not head:
        raise SeedFileError(path, "empty file")

    if head[:4] == b"PAR1":
        if format not in (None, "parquet"):
            raise SeedFileError(path, f"is a Parquet file, not {format!r}; its format is 'parquet'")
        records = _parquet_records(path, head if whole else read_bytes(path))
        return Loaded("parquet", _flavor(path, "parquet", records, None), records)
    if format == "parquet":
        raise SeedFileError(path, "not a Parquet file (no PAR1 magic bytes at the start)")

    if head.startswith(BOM):
        head = head[len(BOM) :]
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise SeedFileError(
            path,
            f"invalid UTF-8: byte 0x{head[0]:02x} at line 1, column 1 (the file looks like UTF-16; save it as UTF-8)",
        )
    utf16 = _utf16_without_bom(head)
    if utf16:
        raise SeedFileError(
            path, f"the file looks like {utf16} without a byte-order mark (every other byte is 0); save it as UTF-8"
        )
    if not head.strip() and (whole or not _without_bom(read_bytes(path)).strip()):
        raise SeedFileError(path, "empty file (only whitespace)")

    data = head if whole else None  # the whole file, once it is needed
    if format == "alpaca_jsonl":
        container = "jsonl"
    elif format == "alpaca_json" or head.lstrip()[:1] == b"[":
        container = "array"
    elif not whole and _first_line_is_json(head):
        container = "jsonl"  # a JSON value per line: never one document spread over lines
    else:
        data = data if data is not None else _without_bom(read_bytes(path))
        container = "array" if data.lstrip()[:1] == b"[" else _object_or_lines(path, data)

    records = None
    if container == "array":
        data = data if data is not None else _without_bom(read_bytes(path))
        records = array_records(path, data, lines_fallback=format is None)
    if records is None:  # JSON Lines, or several JSON values one per line that start with an array
        container = "jsonl"
        del data  # JSON Lines are read from the file, line by line, on every pass
        records = jsonl_records(path)
        if next(records(), None) is None:
            raise SeedFileError(path, "empty file (only blank lines)")

    flavor = _flavor(path, container, records, format)
    if flavor == "alpaca":
        name = "alpaca_json" if container == "array" else "alpaca_jsonl"
    else:
        name = flavor
    return Loaded(name, flavor, records)


def _without_bom(data: bytes) -> bytes:
    return data[len(BOM) :] if data.startswith(BOM) else data


def _first_line_is_json(head: bytes) -> bool:
    """Whether the first non-blank line (complete within ``head``) is a JSON value on its own."""
    for line in head.split(b"\n")[:-1]:  # the last piece may be cut
        if line.strip():
            try:
                json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                return False
            return True
    return False


def _utf16_without_bom(data: bytes) -> str | None:
    """ "UTF-16 LE" / "UTF-16 BE" when the start of the file is ASCII text stored in 16 bits."""
    head = data[:4096]
    if len(head) < 4 or b"\x00" not in head:
        return None
    even, odd = head[0::2], head[1::2]
    if odd.count(0) >= 0.9 * len(odd) and even.count(0) <= 0.1 * len(even):
        return "UTF-16 LE"
    if even.count(0) >= 0.9 * len(even) and odd.count(0) <= 0.1 * len(odd):
        return "UTF-16 BE"
    return None


def _object_or_lines(path: Path, data: bytes) -> str:
    """Data that does not start with '[': JSON Lines, unless the whole file is one JSON value
    spread over several lines (a top-level object or scalar), which is an error."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "jsonl"  # not one JSON document: read it line by line
    n_lines = sum(1 for line in data.split(b"\n") if line.strip())
    if isinstance(value, dict):
        if n_lines == 1:
            return "jsonl"  # a single JSON Lines record
        hint = ""
        for key, inner in value.items():
            if isinstance(inner, list) and inner and all(isinstance(x, dict) for x in inner):
                hint = f" (its key {short(key)} holds an array of {len(inner)} objects: use that array)"
                break
        raise SeedFileError(path, f"expected a JSON array of objects, found a top-level object{hint}")
    raise SeedFileError(path, f"expected a JSON array of objects, found a top-level {json_type(value).split()[-1]}")


def _parquet_records(path: Path, data: bytes) -> Callable[[], Iterator[Record]]:
    try:
        df = pl.read_parquet(io.BytesIO(data))
        next(df.iter_rows(named=True), None)  # a column the row reader cannot convert fails here
    except Exception as e:  # noqa: BLE001 - any reader failure means the file is unusable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SeedFileError(path, f"unreadable Parquet file: {clip(first, 200)}") from None
    if not df.height:
        raise SeedFileError(path, "the Parquet file has no rows")
    # the table stays columnar; each row becomes Python values only while it is validated
    return lambda: (Record(f"record {i}", row, clip(dump(row))) for i, row in enumerate(df.iter_rows(named=True), 1))


def _flavor(path: Path, container: str, records: Callable[[], Iterator[Record]], format: str | None) -> str:
    """Which record layout the file uses: "alpaca", "sharegpt" or "messages"."""
    if format is not None and format != "parquet":
        return "alpaca" if format.startswith("alpaca") else format
    # a key votes when it holds a value (Parquet has every column in every row, often null);
    # when no key holds one, presence alone decides. One pass over the records counts both.
    first_keys, first = None, None
    by_value: Counter[str] = Counter()
    by_presence: Counter[str] = Counter()
    for rec in records():
        if first is None:
            first = rec
        obj = rec.value
        if not isinstance(obj, dict):
            continue
        if first_keys is None:
            first_keys = list(obj)
        for votes, keys in ((by_value, {k for k, v in obj.items() if v is not None}), (by_presence, obj.keys())):
            if "conversations" in keys:
                votes["sharegpt"] += 1
            elif "messages" in keys:
                votes["messages"] += 1
            elif "instruction" in keys or "output" in keys:
                votes["alpaca"] += 1
    votes = by_value or by_presence
    if votes:
        priority = {"alpaca": 0, "sharegpt": 1, "messages": 2}
        return max(votes, key=lambda f: (votes[f], -priority[f]))
    if first_keys is None:  # not a single object among the records
        if container == "array":
            raise SeedFileError(
                path, f"expected a JSON array of objects, found an array whose record 1 is {json_type(first.value)}"
            )
        what = first.problem[1] if first.problem else f"{NOT_AN_OBJECT}: {json_type(first.value)}"
        raise SeedFileError(
            path,
            "unknown format: not a JSON array, JSON Lines of objects or Parquet "
            f"(no line holds a JSON object; {first.location}: {what})",
        )
    shown = ", ".join(short(k) for k in first_keys[:8]) or "none"
    raise SeedFileError(
        path,
        "cannot tell the format: no record has an instruction/output, conversations or messages "
        f"key (keys of the first object: {shown}); give the format explicitly",
    )
