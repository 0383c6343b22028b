"""Write a sample table for training tools: Alpaca / LLaMA-Factory JSON(L), chat ``messages``, or Parquet.

Every exported row carries its provenance (sample_id, round, origin_id, operation), so a
trained model's data can be traced back through the rounds.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

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


class ExportError(ValueError):
    """The output path cannot be written as asked; nothing was written."""


_KINDS = (
    (stat.S_ISLNK, "is a symbolic link; give the path of a regular file (the link is left alone)"),
    (stat.S_ISDIR, "is a directory; give a file path (e.g. inside it)"),
    (stat.S_ISFIFO, "is a FIFO (named pipe); export writes regular files only (use --out - for standard output)"),
    (stat.S_ISCHR, "is a device file; export writes regular files only (use --out - for standard output)"),
    (stat.S_ISBLK, "is a block device file; export writes regular files only"),
    (stat.S_ISSOCK, "is a socket; export writes regular files only"),
)


def check_output_path(out: str | Path) -> int | None:
    """Refuse anything at ``out`` but a regular file (never replace a link, FIFO, device or folder).
    Returns the permission bits of the existing file, None when there is none."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ExportError(f"{out}: cannot use this path: {exc.strerror or exc}") from None
    except ValueError:  # a NUL character in the path
        raise ExportError(f"{str(out)!r}: not a usable path (it contains a NUL character)") from None
    for test, why in _KINDS:
        if test(st.st_mode):
            raise ExportError(f"{out}: {why}")
    return stat.S_IMODE(st.st_mode)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write(df: pl.DataFrame, fh: BinaryIO, fmt: str, layout: str) -> None:
    if fmt == "parquet":
        if layout == "alpaca":
            df.select("instruction", "input", "output", *PROVENANCE).write_parquet(fh)
        else:
            pl.DataFrame(to_records(df, layout)).write_parquet(fh)
        return
    records = to_records(df, layout)
    if fmt == "json":
        fh.write(json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8"))
    else:
        for rec in records:
            fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))


def export_table(
    df: pl.DataFrame, out: str | Path, fmt: str = "jsonl", layout: str = "alpaca", *, stdout: BinaryIO | None = None
) -> Path | str:
    """Write to ``out`` atomically (a temporary file renamed into place); returns the path.

    ``out="-"`` writes to standard output (``stdout``, default ``sys.stdout.buffer``). Only a
    regular file is ever replaced (:class:`ExportError` otherwise, nothing written); a new file
    gets the umask's mode, a replaced one keeps its mode.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if str(out) == "-":
        fh = stdout if stdout is not None else sys.stdout.buffer
        _write(df, fh, fmt, layout)
        fh.flush()
        return "-"
    out = Path(out)
    mode = check_output_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise ExportError(f"{out}: cannot write here: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _umask_mode() if mode is None else mode)
            _write(df, fh, fmt, layout)
        check_output_path(out)  # nothing else appeared there meanwhile
        os.replace(tmp, out)
    except OSError as exc:
        raise ExportError(f"{out}: cannot write: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
