"""The gate benchmark's candidates of known kind are built from the controlled set's origins,
and its tallies count what the gate accepted, with intervals."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest

from benchmarks import controlled
from benchmarks.gate_oracle import known_candidates, row_key, tally, wilson


def _seed_rows(n: int = 12) -> list[dict]:
    cats = ("math", "writing", "facts")
    return [
        {
            "instruction": f"Question number {i}: explain topic {i} in a few words, please.",
            "input": "",
            "output": f"Topic {i} is explained by answer {i}.",
            "category": cats[i % 3],
        }
        for i in range(n)
    ]


def _planned(rows: list[dict], picks: list[tuple[dict, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "origin_id": f"id{j}",
                "operation": op,
                "instruction_before": r["instruction"] + "  ",  # ingestion may change whitespace
                "input_before": r["input"],
                "output_before": r["output"],
            }
            for j, (r, op) in enumerate(picks)
        ]
    )


def test_known_candidates_come_from_each_rows_origin():
    seed = _seed_rows()
    rows = controlled.build(seed, n_clean=2, n_quality=4, n_hard=2, n_dup_clusters=0, dup_size=3, n_isolated=1, seed=0)
    by = {}
    for r in rows:
        by.setdefault(r["kind"], r)
    picks = [
        (by["garbled_prompt"], "rewritten"),
        (by["caesar"], "simplified"),
        (by["wrong_answer"], "rewritten"),
        (by["isolated_topic"], "extended"),
        (by["clean"], "rewritten"),
    ]
    stranger = {"instruction": "not in the set", "input": "", "output": "nowhere"}
    planned = _planned(rows, [*picks, (stranger, "rewritten")])
    cands, unmatched = known_candidates(planned, rows, seed, seed=0)
    assert unmatched == 1
    kinds = {oid: sorted(g["known_kind"].to_list()) for (oid,), g in cands.group_by("origin_id")}
    # a defective row with an origin: four kinds; an isolated row extended: also its paraphrase;
    # no origin (wrong fact) or a clean row: only the row itself returned unchanged
    assert kinds["id0"] == kinds["id1"] == ["garbled", "good", "unchanged", "unrelated"]
    assert kinds["id3"] == ["garbled", "good", "paraphrase", "unchanged", "unrelated"]
    assert kinds["id2"] == kinds["id4"] == ["unchanged"]
    ext = {row["known_kind"]: row for row in cands.filter(pl.col("origin_id") == "id3").iter_rows(named=True)}
    q, a = controlled.EXTENSIONS[by["isolated_topic"]["instruction"]]
    assert (ext["good"]["instruction_after"], ext["good"]["output_after"]) == (q, a)
    assert ext["unrelated"]["instruction_after"] == q and ext["unrelated"]["output_after"] != a
    pq, pa = controlled.PARAPHRASES[by["isolated_topic"]["instruction"]]
    assert (ext["paraphrase"]["instruction_after"], ext["paraphrase"]["output_after"]) == (pq, pa)
    for oid, (r, _op) in zip(("id0", "id1"), picks[:2]):
        origin = seed[r["source_index"]]
        c = {row["known_kind"]: row for row in cands.filter(pl.col("origin_id") == oid).iter_rows(named=True)}
        assert (c["good"]["instruction_after"], c["good"]["output_after"]) == (origin["instruction"], origin["output"])
        assert (c["unchanged"]["instruction_after"], c["unchanged"]["output_after"]) == (r["instruction"], r["output"])
        assert c["garbled"]["output_after"] == origin["output"]
        assert c["garbled"]["instruction_after"] != origin["instruction"]
        assert c["unrelated"]["instruction_after"] == origin["instruction"]
        donor = next(s for s in seed if s["output"] == c["unrelated"]["output_after"])
        assert donor["category"] != origin["category"]
        assert all(row["defect"] == r["defect"] and row["defect_kind"] == r["kind"] for row in c.values())
    assert set(cands["status"]) == {"ok"} and not cands["truncated"].any()
    # every candidate keeps its planned operation and origin
    assert set(cands.filter(pl.col("origin_id") == "id3")["operation"]) == {"extended"}


def test_row_key_ignores_whitespace_only():
    assert row_key(" a  b\n", "", "c ") == row_key("a b", None, "c")
    assert row_key("a b", "", "c") != row_key("a b", "", "d")


def test_wilson_interval():
    assert wilson(0, 0) is None
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-3)


def test_tally_counts_accepted_per_group():
    v = pl.DataFrame(
        {
            "known_kind": ["good", "good", "good", "garbled", "garbled"],
            "operation": ["rewritten", "rewritten", "simplified", "rewritten", "simplified"],
            "passed": [True, False, True, False, False],
        }
    )
    t = tally(v)
    assert t["good"]["accepted"] == 2 and t["good"]["judged"] == 3 and t["good"]["rate"] == pytest.approx(2 / 3)
    assert t["garbled"] == {"accepted": 0, "judged": 2, "rate": 0.0, "ci": wilson(0, 2)}
    by_op = tally(v, ("known_kind", "operation"))
    assert by_op["good/rewritten"]["accepted"] == 1 and by_op["good/simplified"]["accepted"] == 1


def test_gate_section_judges_every_kind_on_a_real_round(tmp_path, model_cache, monkeypatch):
    """A whole controlled round on the tiny model (its verdicts mean nothing, their bookkeeping
    does): every planned operation found, each kind judged under both bars, typical never more
    lenient than flag, and the round kept for --gate-from."""
    from benchmarks.common import Settings
    from benchmarks.gate_oracle import run
    from middo_pipeline.models.loading import TINY_MODEL

    monkeypatch.setenv("MIDDO_MODEL_CACHE", str(model_cache))
    settings = Settings.quick(
        model=TINY_MODEL,
        device="cpu",
        det_clean=3,
        det_clean_siblings=1,
        det_quality=8,
        det_hard=4,
        det_isolated=2,
        gate_candidates=1,
        gate_keep=str(tmp_path / "round"),
    )
    out = run(settings)
    assert out["rows"] == 3 * 2 + 8 + 4 + 2 and out["unmatched_operations"] == 0
    planned = sum(out["planned_operations"].values())
    assert planned > 0
    for bar in ("flag", "typical"):
        by_kind = out[bar]["by_kind"]
        assert by_kind["unchanged"]["judged"] == planned  # one per planned operation
        assert by_kind["optimizer"]["judged"] == planned  # one candidate each
        assert by_kind["good"]["judged"] > 0  # some flagged rows have a known origin
        for k in ("garbled", "unrelated"):
            assert by_kind[k]["judged"] == by_kind["good"]["judged"]
        for v in by_kind.values():
            assert 0 <= v["accepted"] <= v["judged"]
    assert out["clean_rows_in_round"] == 3 * 2  # the clean topics and their paraphrases
    # typical adds rules to flag (with either medians), and dropping near_origin removes one
    for kind, v in out["typical"]["by_kind"].items():
        assert v["accepted"] <= out["flag"]["by_kind"][kind]["accepted"], kind
        assert out["typical, clean medians"]["by_kind"][kind]["accepted"] <= out["flag"]["by_kind"][kind]["accepted"]
        assert out["flag"]["by_kind"][kind]["accepted"] <= out["flag, near_origin off"]["by_kind"][kind]["accepted"]
        # near-duplicates by the cosine alone: the same-task reading only ever lets more through
        for bar in ("flag", "typical"):
            alone = out[f"{bar}, duplicates by cosine alone"]["by_kind"][kind]["accepted"]
            assert alone <= out[bar]["by_kind"][kind]["accepted"], (bar, kind)
            # the new-task rule only ever takes candidates away
            assert out[bar]["by_kind"][kind]["accepted"] <= out[f"{bar}, new_task off"]["by_kind"][kind]["accepted"]
            # the repair waiver only ever lets candidates through, and never past near_origin off
            with_repair = out[bar]["by_kind"][kind]["accepted"]
            assert out[f"{bar}, repair off"]["by_kind"][kind]["accepted"] <= with_repair
            assert bar != "flag" or with_repair <= out["flag, near_origin off"]["by_kind"][kind]["accepted"]
            # the IFD ceiling only ever takes candidates away
            assert with_repair <= out[f"{bar}, no IFD ceiling"]["by_kind"][kind]["accepted"]
            # and so does the fluency floor
            assert with_repair <= out[f"{bar}, no fluency floor"]["by_kind"][kind]["accepted"]
    extensions = out["planned_operations"].get("extended", 0)
    assert out["flag"]["by_kind"].get("paraphrase", {}).get("judged", 0) <= extensions
    # the pipeline's cascade gave the same verdicts as reading every candidate in full
    # (else run raised), and the stages it settled candidates at add up to what was generated
    for bar in ("flag", "typical"):
        c = out["cascade"][bar]
        assert c["same_verdicts"] and c["seconds"] > 0
        assert set(c["settled_by_stage"]) <= {"text", "base", "full"} and sum(c["settled_by_stage"].values()) > 0
    assert out["cascade"]["seconds_full"] > 0
    again = run(dataclasses.replace(settings, gate_from=str(tmp_path / "round" / "middo")))
    assert again["reused_round"] and again["flag"]["by_kind"] == out["flag"]["by_kind"]


def test_headline_and_table_carry_the_gate_rates():
    from benchmarks.__main__ import headline, table

    blk = {
        bar: {
            "by_kind": {"good": {"accepted": a, "judged": 10, "rate": a / 10, "ci": wilson(a, 10)}},
            "bad_all": {"accepted": b, "judged": 30, "rate": b / 30, "ci": wilson(b, 30)},
        }
        for bar, a, b in (("flag", 6, 3), ("typical", 2, 0))
    }
    head = headline({"gate": blk})
    assert head["gate_accepts_good"] == {"flag": 0.6, "typical": 0.2}
    assert head["gate_accepts_bad"] == {"flag": 0.1, "typical": 0.0}
    assert head["gate_accepts_good_ci"]["typical"] == wilson(2, 10)
    text = table({"gate": blk}, head, {})
    assert "gate [flag] accepts good" in text and "6/10" in text and "2/10" in text
    skipped = headline({"gate": {"skipped": True, "reason": "--quick"}})
    assert skipped["gate_accepts_good"] is None and skipped["gate_accepts_bad_ci"] is None


def test_every_isolated_item_has_a_written_extension_in_its_own_domain():
    """A good extension is another task with another answer: not the item again, and not one of
    the light edits the controlled set uses to make duplicates."""
    assert set(controlled.EXTENSIONS) == {q for q, _ in controlled.ISOLATED}
    for q, a in controlled.ISOLATED:
        eq, ea = controlled.EXTENSIONS[q]
        assert eq != q and ea != a and ea.strip(), q
        assert eq not in {edit(q) for edit in controlled._DUP_EDITS}, q


def test_every_isolated_item_has_a_written_paraphrase_of_the_same_task():
    """A paraphrase is the item's own task reworded (not the item, not a light edit), and the
    near-duplicate rule's text reading takes most of them for the same task and most written
    extensions for another one (the gate also needs the embedding to be that close)."""
    from middo_pipeline.core.text_rules import same_task

    assert set(controlled.PARAPHRASES) == {q for q, _ in controlled.ISOLATED}
    same_para = same_ext = 0
    for q, a in controlled.ISOLATED:
        pq, pa = controlled.PARAPHRASES[q]
        assert pq != q and pa != a and pa.strip(), q
        assert pq not in {edit(q) for edit in controlled._DUP_EDITS}, q
        eq, ea = controlled.EXTENSIONS[q]
        same_para += same_task(q, a, pq, pa)
        same_ext += same_task(q, a, eq, ea)
    assert same_para >= 0.75 * len(controlled.ISOLATED) and same_ext <= 0.25 * len(controlled.ISOLATED)


def test_keeping_a_round_in_a_used_folder_is_refused(tmp_path):
    """A loop in a folder that holds a kept round would run round 2 on top of it, and the
    section would read round 1's old tables: refused before anything runs."""
    from benchmarks.common import Settings
    from benchmarks.gate_oracle import run

    (tmp_path / "middo").mkdir()
    with pytest.raises(FileExistsError, match="--gate-from"):
        run(Settings.quick(gate_keep=str(tmp_path)))
