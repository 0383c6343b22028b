"""Reading a seed file into the canonical sample table, with a record of every row left out.

Formats, told apart by the file's content (never by its name):

- ``alpaca_json``: a JSON array of objects with ``instruction``, optional ``input``, ``output``.
- ``alpaca_jsonl``: the same objects, one per line (JSON Lines).
- ``sharegpt``: objects with ``"conversations": [{"from": ..., "value": ...}, ...]``, as a JSON
  array or as JSON Lines.
- ``messages``: OpenAI-style objects with ``"messages": [{"role": ..., "content": ...}, ...]``,
  as a JSON array or as JSON Lines.
- ``parquet``: a Parquet file (``PAR1`` magic bytes) with alpaca columns, or a
  ``conversations`` or ``messages`` column holding turns as above.

A conversation becomes one sample: its first human/user turn is the instruction and the
gpt/assistant turn right after it is the output (``input`` is empty). Leading ``system`` (and, for
``messages``, ``developer``) turns are skipped and their text is not used. Turns after that first
pair are dropped — the record is *not* quarantined for it — and the number of accepted
conversations that lost turns this way is ``IngestResult.truncated_conversations``.

Every record ends in exactly one of two tables: ``samples`` (canonical, round 0, operation
``seed``) or ``quarantine`` (one row per rejected record, for the first problem found), so
``total_records == samples.height + quarantine.height``. A reason reads ``"<kind>"`` or
``"<kind>: <detail>"``; :meth:`IngestResult.rejected_by_reason` counts by kind. Extra keys in a
record (``category``, ``id``, ...) are ignored. Blank lines in JSON Lines are not records. A
UTF-8 byte-order mark is tolerated.

A problem with the file as a whole (missing, empty, unreadable, truncated or invalid JSON array,
invalid UTF-8 outside JSON Lines, a top-level object or scalar, a format that cannot be told)
raises :class:`SeedFileError`, whose message names the file, the reason and, where known, the
line and column.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from middo_pipeline.core.schema import (
    QUARANTINE_SCHEMA,
    make_sample_id,
    make_samples,
    normalize_text,
)

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

RECORD_FIELD = "(record)"  # the ``field`` of a problem with the record as a whole

_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


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


def detect_format(path: str | Path) -> str:
    """The format of a seed file, read from its content. Raises SeedFileError when it cannot
    be told (or the file is unusable)."""
    return _load(Path(path), None).format


def read_seed(path: str | Path, format: str | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> IngestResult:
    """Read a seed file into canonical samples plus a quarantine of the records left out.

    ``format`` overrides detection (one of FORMATS); ``max_chars`` bounds
    ``len(instruction) + len(input) + len(output)`` after normalization.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    path = Path(path)
    loaded = _load(path, format)
    return _ingest(path, loaded, max_chars)


# ----------------------------------------------------------------------------- records


@dataclass
class _Record:
    location: str  # "line 3", "record 2 (line 7)", "record 2"
    value: Any
    raw: str
    problem: tuple[str, str] | None = None  # (field, reason) found while reading


@dataclass
class _Loaded:
    format: str
    flavor: str  # "alpaca", "sharegpt", "messages"
    records: list[_Record]


class _Reject(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _json_type(value: Any) -> str:
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


def _clip(text: str, limit: int = RAW_CHARS) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return text if len(text) <= limit else text[:limit] + "…"


def _short(value: Any) -> str:
    return repr(_clip(str(value), 40))


def _dump(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, TypeError, RecursionError):
        return _clip(repr(value)) if not isinstance(value, (list, dict)) else "<unprintable>"


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


# ----------------------------------------------------------------------------- loading


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SeedFileError(path, "file not found") from None
    except IsADirectoryError:
        raise SeedFileError(path, "is a directory, not a file") from None
    except OSError as e:
        raise SeedFileError(path, f"cannot read the file: {e.strerror or e}") from None


def _load(path: Path, format: str | None) -> _Loaded:
    if format is not None and format not in FORMATS:
        raise SeedFileError(path, f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    data = _read_bytes(path)
    if not data:
        raise SeedFileError(path, "empty file")

    if data[:4] == b"PAR1":
        if format not in (None, "parquet"):
            raise SeedFileError(path, f"is a Parquet file, not {format!r}; its format is 'parquet'")
        records = _parquet_records(path, data)
        return _Loaded("parquet", _flavor(path, "parquet", records, None), records)
    if format == "parquet":
        raise SeedFileError(path, "not a Parquet file (no PAR1 magic bytes at the start)")

    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise SeedFileError(
            path,
            f"invalid UTF-8: byte 0x{data[0]:02x} at line 1, column 1 (the file looks like UTF-16; save it as UTF-8)",
        )
    if not data.strip():
        raise SeedFileError(path, "empty file (only whitespace)")

    if format == "alpaca_jsonl":
        container = "jsonl"
    elif format == "alpaca_json" or data.lstrip()[:1] == b"[":
        container = "array"
    else:
        container = _object_or_lines(path, data)

    records = _array_records(path, data, lines_fallback=format is None) if container == "array" else None
    if records is None:  # JSON Lines, or several JSON values one per line that start with an array
        container = "jsonl"
        records = _jsonl_records(data)
        if not records:
            raise SeedFileError(path, "empty file (only blank lines)")

    flavor = _flavor(path, container, records, format)
    if flavor == "alpaca":
        name = "alpaca_json" if container == "array" else "alpaca_jsonl"
    else:
        name = flavor
    return _Loaded(name, flavor, records)


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
                hint = f" (its key {_short(key)} holds an array of {len(inner)} objects: use that array)"
                break
        raise SeedFileError(path, f"expected a JSON array of objects, found a top-level object{hint}")
    raise SeedFileError(path, f"expected a JSON array of objects, found a top-level {_json_type(value).split()[-1]}")


def _decode_whole(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        col = len(data[line_start : e.start].decode("utf-8", "replace")) + 1
        raise SeedFileError(path, f"invalid UTF-8: byte 0x{data[e.start]:02x} at line {line}, column {col}") from None


def _array_records(path: Path, data: bytes, lines_fallback: bool) -> list[_Record] | None:
    """Records of a file that is one JSON array. None when ``lines_fallback`` and the file holds
    several JSON values one after another (JSON Lines whose first line is an array)."""
    text = _decode_whole(path, data)
    items, spans = _walk_array(text)
    if items is None:
        if lines_fallback and _is_extra_data(text):
            return None
        value = _parse_document(path, text)  # raises with the exact position
        if not isinstance(value, list):
            raise SeedFileError(
                path, f"expected a JSON array of objects, found a top-level {_json_type(value).split()[-1]}"
            )
        items, spans = value, None
    if not items:
        raise SeedFileError(path, "the JSON array is empty (no records)")
    records = []
    line, prev = 1, 0
    for i, item in enumerate(items, 1):
        if spans is None:
            records.append(_Record(f"record {i}", item, _clip(_dump(item))))
            continue
        start, end = spans[i - 1]
        line += text.count("\n", prev, start)
        prev = start
        raw = text[start : min(end, start + RAW_CHARS + 1)]
        records.append(_Record(f"record {i} (line {line})", item, _clip(raw)))
    return records


def _walk_array(text: str) -> tuple[list | None, list[tuple[int, int]] | None]:
    """Parse a top-level JSON array element by element, keeping where each one starts and
    ends. (None, None) when the text is not exactly one well-formed array."""
    decoder = json.JSONDecoder()
    items, spans = [], []
    try:
        idx = _WS.match(text).end()
        if text[idx] != "[":
            return None, None
        idx = _WS.match(text, idx + 1).end()
        if text[idx] != "]":
            while True:
                item, end = decoder.raw_decode(text, idx)
                items.append(item)
                spans.append((idx, end))
                idx = _WS.match(text, end).end()
                if text[idx] == ",":
                    idx = _WS.match(text, idx + 1).end()
                    continue
                if text[idx] == "]":
                    break
                return None, None
        if _WS.match(text, idx + 1).end() != len(text):
            return None, None
    except (ValueError, IndexError, RecursionError):
        return None, None
    return items, spans


def _is_extra_data(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return e.msg == "Extra data" and "\n" in text[: e.pos]
    except (ValueError, RecursionError):
        return False
    return False


def _parse_document(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SeedFileError(path, _describe_json_error(text, e)) from None
    except RecursionError:
        raise SeedFileError(path, "invalid JSON: nested too deeply to parse") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise SeedFileError(path, f"invalid JSON: {e}") from None


def _describe_json_error(text: str, e: json.JSONDecodeError) -> str:
    end = len(text.rstrip())
    if e.msg.startswith("Unterminated string"):
        line, col = _line_col(text, end)
        return (
            f"truncated JSON at line {line}, column {col} (file ends inside a string "
            f"that starts at line {e.lineno}, column {e.colno})"
        )
    if e.pos >= end:
        line, col = _line_col(text, end)
        inside = _innermost_open(text[:end])
        where = f" (file ends inside {inside})" if inside else ""
        return f"truncated JSON at line {line}, column {col}{where}"
    hint = " (several JSON values one after another: is this JSON Lines?)" if e.msg == "Extra data" else ""
    return f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}{hint}"


def _innermost_open(text: str) -> str | None:
    stack: list[str] = []
    for m in _BRACKETS.finditer(_JSON_STRING.sub('""', text)):
        c = m.group()
        if c in "[{":
            stack.append(c)
        elif stack:
            stack.pop()
    if not stack:
        return None
    return "an object" if stack[-1] == "{" else "an array"


def _jsonl_records(data: bytes) -> list[_Record]:
    records = []
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        location = f"line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            col = len(line[: e.start].decode("utf-8", "replace")) + 1
            reason = f"{INVALID_UTF8}: byte 0x{line[e.start]:02x} at column {col}"
            raw = _clip(line.decode("utf-8", "backslashreplace"))
            records.append(_Record(location, None, raw, (RECORD_FIELD, reason)))
            continue
        raw = _clip(text.rstrip("\r"))
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            reason = f"{INVALID_JSON}: {e.msg} at column {e.colno}"
            records.append(_Record(location, None, raw, (RECORD_FIELD, reason)))
            continue
        except RecursionError:
            reason = f"{INVALID_JSON}: nested too deeply to parse"
            records.append(_Record(location, None, raw, (RECORD_FIELD, reason)))
            continue
        except ValueError as e:
            records.append(_Record(location, None, raw, (RECORD_FIELD, f"{INVALID_JSON}: {e}")))
            continue
        records.append(_Record(location, value, raw))
    return records


def _parquet_records(path: Path, data: bytes) -> list[_Record]:
    try:
        df = pl.read_parquet(io.BytesIO(data))
        rows = list(df.iter_rows(named=True))
    except Exception as e:  # noqa: BLE001 - any reader failure means the file is unusable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SeedFileError(path, f"unreadable Parquet file: {_clip(first, 200)}") from None
    if not rows:
        raise SeedFileError(path, "the Parquet file has no rows")
    return [_Record(f"record {i}", row, _clip(_dump(row))) for i, row in enumerate(rows, 1)]


def _flavor(path: Path, container: str, records: list[_Record], format: str | None) -> str:
    """Which record layout the file uses: "alpaca", "sharegpt" or "messages"."""
    if format is not None and format != "parquet":
        return "alpaca" if format.startswith("alpaca") else format
    objects = [rec.value for rec in records if isinstance(rec.value, dict)]
    first_keys = list(objects[0]) if objects else None
    votes: Counter[str] = Counter()
    # a key votes when it holds a value (Parquet has every column in every row, often null);
    # when no key holds one, presence alone decides
    for non_null in (True, False):
        for obj in objects:
            keys = {k for k, v in obj.items() if v is not None} if non_null else obj.keys()
            if "conversations" in keys:
                votes["sharegpt"] += 1
            elif "messages" in keys:
                votes["messages"] += 1
            elif "instruction" in keys or "output" in keys:
                votes["alpaca"] += 1
        if votes:
            break
    if votes:
        priority = {"alpaca": 0, "sharegpt": 1, "messages": 2}
        return max(votes, key=lambda f: (votes[f], -priority[f]))
    if first_keys is None:  # not a single object among the records
        first = records[0]
        if container == "array":
            raise SeedFileError(
                path, f"expected a JSON array of objects, found an array whose record 1 is {_json_type(first.value)}"
            )
        what = first.problem[1] if first.problem else f"{NOT_AN_OBJECT}: {_json_type(first.value)}"
        raise SeedFileError(
            path,
            "unknown format: not a JSON array, JSON Lines of objects or Parquet "
            f"(no line holds a JSON object; {first.location}: {what})",
        )
    shown = ", ".join(_short(k) for k in first_keys[:8]) or "none"
    raise SeedFileError(
        path,
        "cannot tell the format: no record has an instruction/output, conversations or messages "
        f"key (keys of the first object: {shown}); give the format explicitly",
    )


# ----------------------------------------------------------------------------- validation


def _text(obj: dict, key: str, field: str | None = None, *, required: bool = True) -> str:
    field = field or key
    if key not in obj:
        if required:
            raise _Reject(field, MISSING_FIELD)
        return ""
    value = obj[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _Reject(field, f"{WRONG_TYPE}: expected a string, found {_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Reject(
            field, f"{INVALID_TEXT}: lone surrogate U+{ord(value[e.start]):04X} at character {e.start + 1}"
        ) from None
    if required and not normalize_text(value):
        raise _Reject(field, f"{BLANK}: empty after stripping whitespace")
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
            raise _Reject(key, MISSING_FIELD)
        turns = obj[key]
        if not isinstance(turns, list):
            raise _Reject(key, f"{WRONG_TYPE}: expected an array, found {_json_type(turns)}")
        if not turns:
            raise _Reject(key, f"{EMPTY_CONVERSATION}: no turns")

        def who(i: int) -> str:
            turn = turns[i]
            if not isinstance(turn, dict):
                raise _Reject(f"{key}[{i}]", f"{WRONG_TYPE}: expected an object, found {_json_type(turn)}")
            return _text(turn, speaker, f"{key}[{i}].{speaker}").strip().lower()

        i = 0
        while i < len(turns) and who(i) in skip:
            i += 1
        if i == len(turns):
            raise _Reject(key, f"{no_first}: only {'/'.join(sorted(skip))} turns")
        first = who(i)
        if first not in prompts:
            raise _Reject(f"{key}[{i}].{speaker}", f"{no_first}: first turn is {_short(turns[i][speaker])}")
        j = i + 1
        if j == len(turns):
            raise _Reject(key, f"{no_reply}: the conversation ends after the {prompt_name} turn")
        second = who(j)
        if second not in replies:
            raise _Reject(
                f"{key}[{j}].{speaker}",
                f"{no_reply}: the {prompt_name} turn is followed by {_short(turns[j][speaker])}, not {reply_name}",
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


def _ingest(path: Path, loaded: _Loaded, max_chars: int) -> IngestResult:
    extract = _EXTRACTORS[loaded.flavor]
    source = str(path)
    rows: list[dict] = []
    rejected: list[dict] = []
    first_seen: dict[str, str] = {}
    truncated = 0
    for rec in loaded.records:
        try:
            if rec.problem is not None:
                raise _Reject(*rec.problem)
            if not isinstance(rec.value, dict):
                raise _Reject(RECORD_FIELD, f"{NOT_AN_OBJECT}: found {_json_type(rec.value)}")
            instruction, input, output, was_truncated = extract(rec.value)
            instruction, input, output = map(normalize_text, (instruction, input, output))
            n_chars = len(instruction) + len(input) + len(output)
            if n_chars > max_chars:
                raise _Reject(RECORD_FIELD, f"{TOO_LONG}: {n_chars} characters (limit {max_chars})")
            sample_id = make_sample_id(instruction, input, output)
            if sample_id in first_seen:
                raise _Reject(RECORD_FIELD, f"{DUPLICATE}: same content as {first_seen[sample_id]}")
        except _Reject as r:
            rejected.append(
                {
                    "source_file": source,
                    "location": rec.location,
                    "field": r.field,
                    "reason": _clip(r.reason),
                    "raw": rec.raw,
                }
            )
            continue
        first_seen[sample_id] = rec.location
        truncated += was_truncated
        rows.append({"sample_id": sample_id, "instruction": instruction, "input": input, "output": output})
    return IngestResult(
        samples=make_samples(rows),
        quarantine=pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA),
        format=loaded.format,
        total_records=len(loaded.records),
        source_file=source,
        truncated_conversations=truncated,
    )


__all__ = [
    "DEFAULT_MAX_CHARS",
    "FORMATS",
    "IngestResult",
    "SeedFileError",
    "detect_format",
    "read_seed",
    "reason_kind",
]
