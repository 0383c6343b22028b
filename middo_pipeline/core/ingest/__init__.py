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

The package: ``decode`` turns bytes into records (with JSON error locations), ``readers`` tells
the format and reads the file, ``validate`` checks each record into a sample or the quarantine.
Records are produced one at a time (a pass tells the format, another validates) and accepted
rows are kept in columnar chunks, so memory grows with the kept table rather than with Python
objects per record. JSON Lines are read line by line from the file (the first MiB tells the
format); a JSON array or a Parquet file is held whole while it is read.
"""

from __future__ import annotations

from pathlib import Path

from middo_pipeline.core.ingest.base import (
    DEFAULT_MAX_CHARS,
    FORMATS,
    IngestResult,
    SeedFileError,
    reason_kind,
)
from middo_pipeline.core.ingest.readers import load
from middo_pipeline.core.ingest.validate import ingest


def detect_format(path: str | Path) -> str:
    """The format of a seed file, read from its content. Raises SeedFileError when it cannot
    be told (or the file is unusable)."""
    return load(Path(path), None).format


def read_seed(path: str | Path, format: str | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> IngestResult:
    """Read a seed file into canonical samples plus a quarantine of the records left out.

    ``format`` overrides detection (one of FORMATS); ``max_chars`` bounds
    ``len(instruction) + len(input) + len(output)`` after normalization.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    path = Path(path)
    loaded = load(path, format)
    return ingest(path, loaded, max_chars)


__all__ = [
    "DEFAULT_MAX_CHARS",
    "FORMATS",
    "IngestResult",
    "SeedFileError",
    "detect_format",
    "read_seed",
    "reason_kind",
]
