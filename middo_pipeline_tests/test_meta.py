"""What the UI shows: rounded figures, the headline first, small charts drawn inline."""

import math

from dagster import MetadataValue

from middo_pipeline.assets._meta import INLINE_LIMIT, bars_md, json_md, rounded, tidy


def test_floats_rounded_everywhere_ints_and_text_kept():
    assert rounded(0.1346153846153846) == 0.1346
    assert rounded(6.251176182768697) == 6.251
    assert rounded({"a": [1.23456789, "x", 3]}) == {"a": [1.235, "x", 3]}
    assert math.isnan(rounded(float("nan")))
    assert rounded(12345678.9) == 12350000.0 and rounded(7) == 7
    assert rounded(json_md({"f": 0.123456})).data == {"f": 0.1235}
    md = MetadataValue.md("x")
    assert rounded(md) is md


def test_headline_keys_first_in_the_given_order():
    meta = tidy(
        {"seconds": 1.0, "hard_fraction": 0.1346153846153846, "hard": 7, "m": 1.0},
        first=("hard", "hard_fraction", "absent"),
    )
    assert list(meta) == ["hard", "hard_fraction", "seconds", "m"]
    assert meta["hard_fraction"] == 0.1346


def test_bar_chart_short_enough_to_render_inline():
    items = [(f"rewrite: some long reason number {i}", i * 3) for i in range(8)]
    md = bars_md(items, "refinements by operation and outcome").value
    assert md.startswith("![") and "data:image/svg+xml" in md
    assert len(md) < INLINE_LIMIT
    assert "#" not in md.split("](", 1)[1]  # a raw '#' would end the data URI
    assert bars_md([]).value == "_(none)_"
