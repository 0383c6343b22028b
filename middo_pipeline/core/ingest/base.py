"""What every part of seed ingestion shares: the file-level error, the result, reason kinds,
and the small text helpers that describe a rejected record."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

FORMATS = ("alpaca_json", "alpaca_jsonl", "sharegpt", "messages", "parquet")
DEFAULT_MAX_CHARS = 16_000
RAW_CHARS = 300  # how much of a rejected record the quarantine keeps

# reason kinds: the text before the first ": " of a quarantine reason
INVALID_JSON = "invalid JSON"
INVALID_UTF8 = "invalid UTF-8"
NOT_AN_OBJECT = "not an object"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
INVALID_TEXT = "invalid text"
BLANK = "blank"
EMPTY_CONVERSATION = "empty conversation"
NO_HUMAN_FIRST = "no human turn first"
NO_GPT_REPLY = "no gpt reply"
NO_USER_FIRST = "no user turn first"
NO_ASSISTANT_REPLY = "no assistant reply"
TOO_LONG = "too long"
DUPLICATE = "duplicate"
DUPLICATE_KEY = "duplicate key"

RECORD_FIELD = "(record)"  # the ``field`` of a problem with the record as a whole


class SeedFileError(Exception):
    """The seed file as a whole cannot be used.

    ``SeedFileError(path, reason)`` reads ``"<path>: <reason>"``; ``SeedFileError(message)``
    takes a whole message (``path`` is then None). Either form pickles.
    """

    def __init__(self, path_or_message: str | Path, reason: str | None = None):
        if reason is None:
            self.path, self.reason = None, str(path_or_message)
            message = self.reason
        else:
            self.path, self.reason = str(path_or_message), reason
            message = f"{self.path}: {reason}"
        super().__init__(message)


@dataclass
class IngestResult:
    samples: pl.DataFrame  # canonical SAMPLE_SCHEMA
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA, one row per rejected record
    format: str  # one of FORMATS
    total_records: int
    source_file: str = ""
    truncated_conversations: int = 0  # accepted conversations whose later turns were dropped

    @property
    def usable(self) -> int:
        return self.samples.height

    @property
    def rejected(self) -> int:
        return self.quarantine.height

    def rejected_by_reason(self) -> dict[str, int]:
        """Rejected records per reason kind, most frequent first."""
        counts = Counter(reason_kind(r) for r in self.quarantine.get_column("reason").to_list())
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def rejection_lines(self) -> list[str]:
        """``file:location: field: reason`` for each rejected record, in file order."""
        return [
            f"{r['source_file']}:{r['location']}: {r['field']}: {r['reason']}"
            for r in self.quarantine.iter_rows(named=True)
        ]

    def summary(self) -> dict[str, Any]:
        """Plain values for logs and asset metadata."""
        return {
            "source_file": self.source_file,
            "format": self.format,
            "total_records": self.total_records,
            "usable": self.usable,
            "rejected": self.rejected,
            "rejected_by_reason": self.rejected_by_reason(),
            "truncated_conversations": self.truncated_conversations,
        }


def reason_kind(reason: str) -> str:
    """``"wrong type: expected a string, found a number"`` -> ``"wrong type"``."""
    return reason.split(": ", 1)[0]


@dataclass
class Record:
    location: str  # "line 3", "record 2 (line 7)", "record 2"
    value: Any
    raw: str
    problem: tuple[str, str] | None = None  # (field, reason) found while reading


class Reject(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def clip(text: str, limit: int = RAW_CHARS) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return text if len(text) <= limit else text[:limit] + "…"


def short(value: Any) -> str:
    return repr(clip(str(value), 40))


def dump(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, TypeError, RecursionError):
        return clip(repr(value)) if not isinstance(value, (list, dict)) else "<unprintable>"
