"""Hostile input and misconfiguration at the command line (issue 14): every case fails fast with
one clear line and a documented exit code, and nothing that is not ours is overwritten.

The README's reliability section lists these cases with what each gets.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import polars as pl
import pytest

from middo_pipeline.cli import main
from middo_pipeline.core.schema import make_samples
from middo_pipeline.core.storage import Storage


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """MIDDO_HOME / DAGSTER_HOME in tmp_path, with round-1's optimized_dataset in storage."""
    home, dagster_home = tmp_path / "middo", tmp_path / "dagster_home"
    monkeypatch.setenv("MIDDO_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    return home, dagster_home


@pytest.fixture
def round_1(homes):
    home, _ = homes
    df = make_samples([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]).with_columns(
        pl.lit(1).alias("round"), pl.col("sample_id").alias("origin_id"), pl.lit("kept").alias("operation"))
    store = Storage(home)
    store.write_table(df, store.table_path("optimized_dataset", "round-1"))
    return df


# ---------------------------------------------------------------------------------------------
# 1. export writes regular files only; `--out -` is standard output
# ---------------------------------------------------------------------------------------------


def test_export_refuses_what_is_not_a_regular_file(round_1, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.write_text("keep")
    link = tmp_path / "out.jsonl"
    link.symlink_to(precious)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, what in [(link, "symbolic link"), (fifo, "FIFO"), (tmp_path, "directory")]:
        assert main(["export", "--round", "1", "--out", str(target)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and what in err and "nothing written" in err, err
    assert link.is_symlink() and precious.read_text() == "keep" and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_export_to_stdout(round_1, capfdbinary):
    assert main(["export", "--round", "1", "--out", "-"]) == 0
    out, err = capfdbinary.readouterr()
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["sample_id"] for r in rows] == round_1["sample_id"].to_list()
    assert b"standard output" in err


def test_export_new_file_gets_umask_mode(round_1, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(["export", "--round", "1", "--out", str(tmp_path / "o.jsonl")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o.jsonl").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# 2. validate refuses special files up front and bounds what it reads
# ---------------------------------------------------------------------------------------------


def _validate_subprocess(path: str, timeout: float = 60):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "middo_pipeline.cli", "validate", path],
                          capture_output=True, text=True, timeout=timeout)


def test_validate_refuses_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "seed.jsonl"
    os.mkfifo(fifo)
    res = _validate_subprocess(str(fifo), timeout=60)  # before the fix: blocked forever
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"error: {fifo}: is a FIFO (named pipe), not a regular file\n"


def test_validate_refuses_devices(capsys):
    assert main(["validate", "/dev/zero"]) == 2  # before the fix: read until MemoryError
    assert capsys.readouterr().err == "error: /dev/zero: is a character device, not a regular file\n"


def test_validate_bounds_the_read(tmp_path, monkeypatch, capsys):
    from middo_pipeline.core.ingest import decode

    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" * 200)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 100)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: too large (") and "limit 100 bytes" in err and err.count("\n") == 1
