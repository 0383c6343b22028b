import json

import polars as pl
import pytest

from middo_pipeline.core.export import export_table
from middo_pipeline.core.schema import make_samples


@pytest.fixture
def table():
    seed = make_samples(
        [
            {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Summarize.", "input": "Cats sleep a lot.", "output": "Cats sleep much."},
        ]
    )
    return seed.with_columns(
        pl.lit(1).alias("round"), pl.col("sample_id").alias("origin_id"), pl.lit("kept").alias("operation")
    )


def test_jsonl_alpaca_has_provenance(table, tmp_path):
    out = export_table(table, tmp_path / "d.jsonl", "jsonl", "alpaca")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row, sid in zip(rows, table["sample_id"].to_list()):
        assert set(row) == {"instruction", "input", "output", "sample_id", "round", "origin_id", "operation"}
        assert row["sample_id"] == sid and row["round"] == 1 and row["operation"] == "kept"


def test_json_messages_layout(table, tmp_path):
    out = export_table(table, tmp_path / "d.json", "json", "messages")
    rows = json.loads(out.read_text())
    assert rows[1]["messages"][0] == {"role": "user", "content": "Summarize.\n\nCats sleep a lot."}
    assert rows[1]["messages"][1]["role"] == "assistant" and rows[1]["origin_id"] == rows[1]["sample_id"]


def test_parquet_roundtrip(table, tmp_path):
    out = export_table(table, tmp_path / "d.parquet", "parquet", "alpaca")
    back = pl.read_parquet(out)
    assert back["sample_id"].to_list() == table["sample_id"].to_list() and "operation" in back.columns


def test_bad_format(table, tmp_path):
    with pytest.raises(ValueError, match="format"):
        export_table(table, tmp_path / "x", "csv")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# hostile output paths: only a regular file is ever written, nothing else replaced (issue 14.1)
# ---------------------------------------------------------------------------------------------


def test_refuses_symlink_and_keeps_it(table, tmp_path):
    from middo_pipeline.core.export import ExportError

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with pytest.raises(ExportError, match="symbolic link"):
        export_table(table, link)
    assert link.is_symlink() and target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "precious.txt"]  # no temp file


def test_refuses_fifo_directory_and_device(table, tmp_path):
    import os
    import stat

    from middo_pipeline.core.export import ExportError

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ExportError, match="FIFO"):
        export_table(table, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ExportError, match="directory"):
        export_table(table, folder)
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pipe"]
    # a device file of our own (a copy of /dev/null's node) so a regression never touches /dev/null
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here (not root)")
    with pytest.raises(ExportError, match="device"):
        export_table(table, device)
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_mode_follows_umask_and_existing_file(table, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = export_table(table, tmp_path / "new.jsonl")
        assert out.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert export_table(table, tmp_path / "private.jsonl").stat().st_mode & 0o777 == 0o600
        existing = tmp_path / "existing.jsonl"
        existing.write_text("old")
        existing.chmod(0o640)
        export_table(table, existing)
        assert existing.stat().st_mode & 0o777 == 0o640 and existing.read_text() != "old"
    finally:
        os.umask(old)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_stdout(table, fmt):
    import io

    buf = io.BytesIO()
    assert export_table(table, "-", fmt, stdout=buf) == "-"
    data = buf.getvalue()
    if fmt == "parquet":
        assert pl.read_parquet(io.BytesIO(data))["sample_id"].to_list() == table["sample_id"].to_list()
    elif fmt == "json":
        assert len(json.loads(data)) == 2
    else:
        assert [json.loads(x)["sample_id"] for x in data.decode().splitlines()] == table["sample_id"].to_list()
