"""Small helpers that turn tables and figures into Dagster metadata a person wants to read."""

import json
import math
from collections.abc import Sequence
from html import escape

import polars as pl
from dagster import JsonMetadataValue, MetadataValue

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


# -- what the UI shows first, and how -------------------------------------------------------
DIGITS = 4  # significant digits: 0.1346153846153846 → 0.1346, 6.251176182768697 → 6.251


def rounded(value, digits: int = DIGITS):
    """``value`` with its floats cut to ``digits`` significant digits, inside dicts and lists too
    and in JSON metadata values (ints, strings, other MetadataValues and non-finite floats as
    they are)."""
    if isinstance(value, MetadataValue):  # records: tuple-like, never iterated
        if isinstance(value, JsonMetadataValue):
            return MetadataValue.json(rounded(value.data, digits))
        return value
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if type(value) in (list, tuple):
        return [rounded(v, digits) for v in value]
    return value


def tidy(meta: dict, first: Sequence[str] = (), digits: int = DIGITS) -> dict:
    """Asset metadata as the UI should show it: the keys in ``first`` (the figures a user scans
    first: flagged counts, accepted rewrites, held-out change) at the top, in that order, then
    the rest; every float rounded to ``digits`` significant digits."""
    head = {k: meta[k] for k in first if k in meta}
    return rounded(head | {k: v for k, v in meta.items() if k not in head}, digits)


INLINE_LIMIT = 1000  # Dagster 1.13 draws a markdown value inline only when it is shorter than this


def _svg_md(svg: str, alt: str) -> str:
    # an angle-bracket link destination may hold spaces: only what would end it is escaped
    uri = "data:image/svg+xml;utf8," + svg.replace("%", "%25").replace("#", "%23").replace("<", "%3C").replace(
        ">", "%3E"
    )
    return f"![{alt}](<{uri}>)"


def bars_md(items: Sequence[tuple[str, float]], title: str = "", fmt: str = "{:g}") -> MetadataValue:
    """A small horizontal bar chart (inline SVG) short enough for Dagster to draw in the metadata
    table itself, no click (a markdown value under 1,000 characters renders inline; a PNG is far
    longer and waits behind "[Show Markdown]"). Falls back to a markdown table when too long."""
    items = [(str(label)[:32], float(v)) for label, v in items if v is not None and math.isfinite(float(v))][:8]
    if not items:
        return MetadataValue.md("_(none)_")
    top = max(abs(v) for _, v in items) or 1.0
    row, bar_w = 15, 150
    y0 = 14 if title else 0
    bars, texts = [], []
    for i, (label, v) in enumerate(items):
        y = y0 + i * row
        w = max(1, round(bar_w * abs(v) / top))
        bars.append(f"M0,{y + 2}h{w}v11h-{w}z")
        texts.append(f"<text x='{w + 3}' y='{y + 12}'>{escape(label)} {escape(fmt.format(v))}</text>")
    head = f"<text y='10' font-weight='bold'>{escape(title[:48])}</text>" if title else ""
    svg = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='380' height='{y0 + row * len(items) + 2}' "
        f"font-family='sans-serif' font-size='11'>{head}<path fill='#4c78a8' d='{''.join(bars)}'/>"
        f"{''.join(texts)}</svg>"
    )
    md = _svg_md(svg, escape(title or "bars"))
    if len(md) < INLINE_LIMIT:
        return MetadataValue.md(md)
    lines = ["| | |", "|---|---|"] + [f"| {label} | {fmt.format(v)} |" for label, v in items]
    return MetadataValue.md("\n".join(lines))
