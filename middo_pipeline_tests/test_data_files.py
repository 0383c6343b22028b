"""The shipped data files: data/eval_large.jsonl (the downstream benchmark's held-out set).

Reads the JSON files only; nothing from middo_pipeline is imported.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
CATEGORIES = {"reasoning", "writing", "coding", "math", "facts", "extraction"}
FIELDS = {"instruction", "input", "output", "choices", "answer_index", "category"}


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def large() -> list[dict]:
    return _jsonl(DATA / "eval_large.jsonl")


@pytest.fixture(scope="module")
def seed() -> list[dict]:
    return json.loads((DATA / "seed_alpaca.json").read_text(encoding="utf-8"))


def test_eval_large_size_and_categories(large):
    assert len(large) >= 220
    counts = Counter(r["category"] for r in large)
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 25, counts


def test_eval_large_rows_are_valid(large):
    for r in large:
        assert set(r) == FIELDS, r
        assert isinstance(r["instruction"], str) and r["instruction"].strip()
        assert isinstance(r["output"], str) and r["output"].strip()
        assert isinstance(r["input"], str)
        ch = r["choices"]
        assert isinstance(ch, list) and len(ch) == 4, r
        assert all(isinstance(c, str) and c.strip() for c in ch), r
        assert len({_norm(c) for c in ch}) == 4, ch
        a = r["answer_index"]
        assert isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 3, r


def test_eval_large_answer_positions_are_spread(large):
    pos = Counter(r["answer_index"] for r in large)
    for k in range(4):
        assert pos[k] >= 0.15 * len(large), pos


def test_eval_large_instructions_unique_and_not_in_seed(large, seed):
    ins = [_norm(r["instruction"]) for r in large]
    assert len(ins) == len(set(ins))
    seed_ins = {_norm(r["instruction"]) for r in seed}
    shared = [i for i in ins if i in seed_ins]
    assert not shared, shared


def test_eval_large_contains_eval_heldout(large):
    heldout = _jsonl(DATA / "eval_heldout.jsonl")
    assert large[: len(heldout)] == heldout
