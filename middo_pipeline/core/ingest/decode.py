"""Bytes to records: a JSON array (each element with its line) or JSON Lines (one record per
line, a bad line a record with its problem), and whole-file JSON errors with their line and column."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from middo_pipeline.core.ingest.base import (
    DUPLICATE_KEY,
    INVALID_JSON,
    INVALID_UTF8,
    RAW_CHARS,
    RECORD_FIELD,
    Record,
    SeedFileError,
    clip,
    dump,
    json_type,
    short,
)

BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


# ----------------------------------------------------------------------------- loading


MAX_FILE_BYTES = 4 * 1024**3  # a seed file larger than this is refused before it is read

_SPECIAL = (
    (stat.S_ISDIR, "is a directory, not a file"),
    (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
    (stat.S_ISCHR, "is a character device, not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
)


def _refuse_special(path: Path, mode: int) -> None:
    for test, why in _SPECIAL:
        if test(mode):
            raise SeedFileError(path, why)
    if not stat.S_ISREG(mode):
        raise SeedFileError(path, "not a regular file")


def _open_regular(path: Path):
    """An open binary file and its stat, if ``path`` is a regular file of at most MAX_FILE_BYTES:
    a FIFO, a device or a folder is refused before it is opened (nothing blocks or reads without end)."""
    try:
        _refuse_special(path, os.stat(path).st_mode)
        # O_NONBLOCK: should a FIFO be swapped in after the check, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SeedFileError(path, "file not found") from None
    except OSError as e:
        raise SeedFileError(path, f"cannot read the file: {e.strerror or e}") from None
    except ValueError:  # a NUL character in the path
        raise SeedFileError(repr(str(path)), "not a usable path (it contains a NUL character)") from None
    fh = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fh.fileno())
        _refuse_special(path, st.st_mode)
        if st.st_size > MAX_FILE_BYTES:
            raise SeedFileError(path, f"too large ({st.st_size} bytes; limit {MAX_FILE_BYTES} bytes): split it")
    except BaseException:
        fh.close()
        raise
    return fh, st


def _too_large(path: Path) -> SeedFileError:
    return SeedFileError(path, f"too large (over {MAX_FILE_BYTES} bytes; limit {MAX_FILE_BYTES} bytes): split it")


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The whole file (or its first ``limit`` bytes), read from a regular file only, bounded."""
    fh, _ = _open_regular(path)
    with fh:
        try:
            data = fh.read((MAX_FILE_BYTES if limit is None else min(limit, MAX_FILE_BYTES)) + 1)
        except OSError as e:
            raise SeedFileError(path, f"cannot read the file: {e.strerror or e}") from None
    if limit is not None:
        return data[:limit]
    if len(data) > MAX_FILE_BYTES:  # bounded even if the file grows meanwhile
        raise _too_large(path)
    return data


def file_lines(path: Path) -> Iterator[bytes]:
    """The lines of a regular file without their "\n" (a UTF-8 byte-order mark dropped), read
    as they are used: the file is never held whole."""
    fh, _ = _open_regular(path)
    read = 0
    with fh:
        for i, line in enumerate(fh):
            read += len(line)
            if read > MAX_FILE_BYTES:
                raise _too_large(path)
            if i == 0 and line.startswith(BOM):
                line = line[len(BOM) :]
            yield line[:-1] if line.endswith(b"\n") else line


def _decode_whole(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        col = len(data[line_start : e.start].decode("utf-8", "replace")) + 1
        raise SeedFileError(path, f"invalid UTF-8: byte 0x{data[e.start]:02x} at line {line}, column {col}") from None


class _Decoder:
    """``json`` with two guards. An integer too long for ``int()`` (over 4300 digits) becomes
    ±inf, a number like any other, instead of failing the whole file. Duplicate keys in an object,
    which ``json`` resolves silently by keeping the last, are collected so the record can be
    rejected as ambiguous."""

    def __init__(self):
        self.duplicates: list[str] = []
        self._json = json.JSONDecoder(parse_int=self._int, object_pairs_hook=self._object)

    @staticmethod
    def _int(text: str):
        try:
            return int(text)
        except ValueError:
            return float("-inf") if text.startswith("-") else float("inf")

    def _object(self, pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.duplicates.append(key)
                seen.add(key)
        return obj

    def loads(self, text: str) -> Any:
        self.duplicates = []
        return self._json.decode(text)

    def raw_decode(self, text: str, idx: int) -> tuple[Any, int]:
        self.duplicates = []
        return self._json.raw_decode(text, idx)

    def problem(self) -> tuple[str, str] | None:
        """The (field, reason) of the value just decoded, when it had a duplicate key."""
        if not self.duplicates:
            return None
        return RECORD_FIELD, f"{DUPLICATE_KEY}: {short(self.duplicates[0])} appears more than once"


def _json_msg(e: json.JSONDecodeError) -> str:
    """``json``'s message without the dangling "at" some end with ("Invalid control character at")."""
    return e.msg[: -len(" at")] if e.msg.endswith(" at") else e.msg


def array_records(path: Path, data: bytes, lines_fallback: bool) -> Callable[[], Iterator[Record]] | None:
    """The records of a file that is one JSON array, as a function that yields them one at a time
    (each call parses again: nothing per record is kept). None when ``lines_fallback`` and the file
    holds several JSON values one after another (JSON Lines whose first line is an array)."""
    text = _decode_whole(path, data)
    n = _count_array(text)
    if n is None:
        if lines_fallback and _is_extra_data(text):
            return None
        value = _parse_document(path, text)  # raises with the exact position
        if not isinstance(value, list):
            raise SeedFileError(
                path, f"expected a JSON array of objects, found a top-level {json_type(value).split()[-1]}"
            )
        if not value:
            raise SeedFileError(path, "the JSON array is empty (no records)")
        return lambda: (Record(f"record {i}", item, clip(dump(item))) for i, item in enumerate(value, 1))
    if not n:
        raise SeedFileError(path, "the JSON array is empty (no records)")

    def records() -> Iterator[Record]:
        line, prev = 1, 0
        for i, (item, start, end, problem) in enumerate(_iter_array(text), 1):
            line += text.count("\n", prev, start)
            prev = start
            raw = text[start : min(end, start + RAW_CHARS + 1)]
            yield Record(f"record {i} (line {line})", item, clip(raw), problem)

    return records


class _NotAnArray(Exception):
    pass


def _iter_array(text: str) -> Iterator[tuple[Any, int, int, tuple[str, str] | None]]:
    """A top-level JSON array element by element: (element, start, end, duplicate-key problem).
    Raises when the text is not exactly one well-formed array."""
    decoder = _Decoder()
    idx = _WS.match(text).end()
    if text[idx] != "[":
        raise _NotAnArray
    idx = _WS.match(text, idx + 1).end()
    if text[idx] != "]":
        while True:
            item, end = decoder.raw_decode(text, idx)
            yield item, idx, end, decoder.problem()
            idx = _WS.match(text, end).end()
            if text[idx] == ",":
                idx = _WS.match(text, idx + 1).end()
                continue
            if text[idx] == "]":
                break
            raise _NotAnArray
    if _WS.match(text, idx + 1).end() != len(text):
        raise _NotAnArray


def _count_array(text: str) -> int | None:
    """How many elements the top-level array has; None when the text is not one well-formed array."""
    n = 0
    try:
        for _ in _iter_array(text):
            n += 1
    except (_NotAnArray, ValueError, IndexError, RecursionError):
        return None
    return n


def _is_extra_data(text: str) -> bool:
    try:
        _Decoder().loads(text)
    except json.JSONDecodeError as e:
        return e.msg == "Extra data" and "\n" in text[: e.pos]
    except (ValueError, RecursionError):
        return False
    return False


def _parse_document(path: Path, text: str) -> Any:
    try:
        return _Decoder().loads(text)
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
    return f"invalid JSON at line {e.lineno}, column {e.colno}: {_json_msg(e)}{hint}"


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


def jsonl_records(source: bytes | Path) -> Callable[[], Iterator[Record]]:
    """The records of JSON Lines (bytes, or a file read line by line), one per non-blank line, as
    a function that yields them one at a time (a line that cannot be parsed is a record with its
    problem)."""
    if isinstance(source, Path):
        return lambda: _jsonl(file_lines(source))
    return lambda: _jsonl(_lines(source))


def _lines(data: bytes) -> Iterator[bytes]:
    start, n = 0, len(data)
    while start < n:
        end = data.find(b"\n", start)
        if end < 0:
            end = n
        yield data[start:end]
        start = end + 1


def _jsonl(lines: Iterator[bytes]) -> Iterator[Record]:
    decoder = _Decoder()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        location = f"line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            col = len(line[: e.start].decode("utf-8", "replace")) + 1
            reason = f"{INVALID_UTF8}: byte 0x{line[e.start]:02x} at column {col}"
            raw = clip(line.decode("utf-8", "backslashreplace"))
            yield Record(location, None, raw, (RECORD_FIELD, reason))
            continue
        raw = clip(text.rstrip("\r"))
        try:
            value = decoder.loads(text)
        except json.JSONDecodeError as e:
            reason = f"{INVALID_JSON}: {_json_msg(e)} at column {e.colno}"
            yield Record(location, None, raw, (RECORD_FIELD, reason))
            continue
        except RecursionError:
            reason = f"{INVALID_JSON}: nested too deeply to parse"
            yield Record(location, None, raw, (RECORD_FIELD, reason))
            continue
        except ValueError as e:
            yield Record(location, None, raw, (RECORD_FIELD, f"{INVALID_JSON}: {e}"))
            continue
        yield Record(location, value, raw, decoder.problem())
