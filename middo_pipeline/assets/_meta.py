"""Small helpers that turn tables and figures into Dagster metadata a person wants to read."""

import json

import polars as pl
from dagster import MetadataValue

from middo_pipeline.core.plots import png_to_markdown


def preview_md(df: pl.DataFrame, columns: list[str] | None = None, n: int = 8, width: int = 120) -> MetadataValue:
    """A markdown table of the first rows, long cells shortened."""
    if columns:
        df = df.select([c for c in columns if c in df.columns])
    df = df.head(n)
    if df.is_empty():
        return MetadataValue.md("_(no rows)_")

    def cell(v) -> str:
        s = "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
        s = s.replace("\n", " ⏎ ").replace("|", "\\|")
        return s if len(s) <= width else s[: width - 1] + "…"

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.iter_rows():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return MetadataValue.md("\n".join(lines))


def image_md(png: bytes, alt: str) -> MetadataValue:
    return MetadataValue.md(png_to_markdown(png, alt))


def length_stats(df: pl.DataFrame, column: str) -> dict[str, float]:
    if df.is_empty():
        return {}
    lengths = df[column].str.len_chars()
    return {
        f"{column}_chars_mean": float(lengths.mean()),
        f"{column}_chars_median": float(lengths.median()),
        f"{column}_chars_max": int(lengths.max()),
    }


def json_md(obj) -> MetadataValue:
    return MetadataValue.json(json.loads(json.dumps(obj, default=str)))
