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
