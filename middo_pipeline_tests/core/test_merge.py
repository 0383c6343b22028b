"""The merge: D_{r+1} with provenance, order, duplicates on record, size policy, conservation."""

from __future__ import annotations

import json

import polars as pl
import pytest

from middo_pipeline.core.merge import (
    ACCOUNTING_SCHEMA,
    DUPLICATES_SCHEMA,
    UNREPAIRED_SCHEMA,
    check_conservation,
    merge_round,
    unrepaired_ids,
)
from middo_pipeline.core.optimizer.operations import REFINED_SCHEMA
from middo_pipeline.core.schema import SAMPLE_SCHEMA, make_sample_id, make_samples, schema_problems

N = 10


@pytest.fixture
def samples() -> pl.DataFrame:
    rows = [
        {"instruction": f"Question number {i}?", "input": "ctx" if i % 3 == 0 else "", "output": f"Answer {i}."}
        for i in range(N)
    ]
    # a previous round's table: mixed operations / rounds that the merge must restamp
    df = make_samples(rows, round_number=1, operation="kept")
    return df.with_columns(pl.col("sample_id").alias("origin_id"))


def sid(samples, i):
    return samples["sample_id"][i]


def refined_row(samples, i, operation, *, ok=True, instruction=None, output=None, reason="llm error: timeout"):
    src = samples.row(i, named=True)
    instruction = instruction or f"{operation} version of question {i}"
    output = output or f"new answer for {i} ({operation})"
    return {
        "origin_id": src["sample_id"],
        "operation": operation,
        "flags": None,
        "instruction_before": src["instruction"],
        "input_before": src["input"],
        "output_before": src["output"],
        "instruction_after": instruction if ok else None,
        "input_after": "" if ok else None,
        "output_after": output if ok else None,
        "new_sample_id": make_sample_id(instruction, "", output) if ok else None,
        "status": "ok" if ok else "failed",
        "failure_reason": None if ok else reason,
        "prompt_cached": False,
        "response_cached": False,
        "optimizer_text": None,
    }


def refined_table(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=REFINED_SCHEMA)


def test_merge_basic_provenance_order_and_conservation(samples):
    refined = refined_table(
        [
            refined_row(samples, 1, "simplified"),
            refined_row(samples, 2, "rewritten"),
            refined_row(samples, 2, "extended"),  # replaced AND extended
            refined_row(samples, 5, "extended"),
            refined_row(samples, 7, "rewritten", ok=False, reason="unparseable: no final prompt marker"),
            refined_row(samples, 8, "simplified", ok=False, reason="llm error: timeout"),
        ]
    )
    res = merge_round(samples, refined, round_number=2, size_policy="grow")
    ds = res.dataset
    assert schema_problems(ds) == []
    assert ds.schema == pl.Schema(SAMPLE_SCHEMA)
    assert ds["round"].unique().to_list() == [2]
    assert ds["origin_id"].null_count() == 0
    assert check_conservation(samples, ds, res.accounting) == []
    # D_{r+1} = (D_r - replaced) + simplified + rewritten + extended
    assert ds.height == N + 2
    expected_order = [
        ("kept", sid(samples, 0)),
        ("simplified", sid(samples, 1)),
        ("rewritten", sid(samples, 2)),
        ("extended", sid(samples, 2)),
        ("kept", sid(samples, 3)),
        ("kept", sid(samples, 4)),
        ("kept", sid(samples, 5)),
        ("extended", sid(samples, 5)),
        ("kept", sid(samples, 6)),
        ("kept", sid(samples, 7)),
        ("kept", sid(samples, 8)),
        ("kept", sid(samples, 9)),
    ]
    assert list(zip(ds["operation"], ds["origin_id"])) == expected_order
    kept = ds.filter(pl.col("operation") == "kept")
    assert (kept["sample_id"] == kept["origin_id"]).all()
    # replaced originals are gone, failed ones stay as kept
    out_ids = set(ds["sample_id"])
    assert sid(samples, 1) not in out_ids and sid(samples, 2) not in out_ids
    assert sid(samples, 7) in out_ids and sid(samples, 8) in out_ids
    new = ds.filter(pl.col("operation") == "simplified").row(0, named=True)
    assert new["instruction"] == "simplified version of question 1" and new["input"] == ""

    acc = {r["sample_id"]: r for r in res.accounting.iter_rows(named=True)}
    assert res.accounting.schema == pl.Schema(ACCOUNTING_SCHEMA)
    assert res.accounting["sample_id"].to_list() == samples["sample_id"].to_list()
    assert acc[sid(samples, 0)]["fate"] == "kept"
    assert acc[sid(samples, 1)]["fate"] == "replaced"
    assert acc[sid(samples, 1)]["replacement_id"] == ds["sample_id"][1]
    assert acc[sid(samples, 2)]["fate"] == "replaced+extended"
    assert acc[sid(samples, 5)]["fate"] == "kept+extended"
    assert acc[sid(samples, 5)]["extension_id"] == ds["sample_id"][7]
    assert acc[sid(samples, 7)]["fate"] == "kept_failed"
    assert acc[sid(samples, 7)]["failure_reason"] == "rewritten: unparseable: no final prompt marker"

    c = res.counts
    json.dumps(c)  # metadata-ready
    assert c["n_in"] == N and c["n_out"] == N + 2 and c["duplicates_removed"] == 0
    assert c["operations"]["simplified"] == {
        "attempted": 2,
        "succeeded": 1,
        "failed": 1,
        "duplicates": 0,
        "in_output": 1,
    }
    assert c["operations"]["extended"]["in_output"] == 2
    assert c["failures_by_reason"] == {
        "rewritten: unparseable: no final prompt marker": 1,
        "simplified: llm error: timeout": 1,
    }
    assert c["rows_by_operation"] == {"kept": 8, "simplified": 1, "rewritten": 1, "extended": 2}
    assert c["dropped_by_size_policy"] == 0 and res.duplicates.height == 0


def test_failed_extension_keeps_origin(samples):
    refined = refined_table([refined_row(samples, 3, "extended", ok=False, reason="same as original")])
    res = merge_round(samples, refined, round_number=1)
    assert res.dataset["sample_id"].to_list() == samples["sample_id"].to_list()
    a = res.accounting.row(3, named=True)
    assert a["fate"] == "kept" and a["extension_status"] == "failed"
    assert a["failure_reason"] == "extended: same as original"
    assert res.counts["failures_by_reason"] == {"extended: same as original": 1}
    assert check_conservation(samples, res.dataset, res.accounting) == []


def test_duplicates_removed_and_recorded(samples):
    s4 = samples.row(4, named=True)
    refined = refined_table(
        [
            # an extension identical to an existing sample (sample 4)
            refined_row(samples, 0, "extended", instruction=s4["instruction"], output=s4["output"]),
            # two extensions that produce the same new sample: the second is a duplicate of the first
            refined_row(samples, 1, "extended", instruction="Same new question?", output="Same answer."),
            refined_row(samples, 6, "extended", instruction="Same new question?", output="Same answer."),
            # a replacement identical to an existing sample: the original is kept
            refined_row(samples, 2, "simplified", instruction=s4["instruction"], output=s4["output"]),
        ]
    )
    assert make_sample_id(s4["instruction"], "", s4["output"]) == s4["sample_id"]  # no input on sample 4
    res = merge_round(samples, refined, round_number=3)
    ds = res.dataset
    assert schema_problems(ds) == [] and check_conservation(samples, ds, res.accounting) == []
    assert ds.height == N + 1 and ds["sample_id"].n_unique() == ds.height
    dups = res.duplicates
    assert dups.schema == pl.Schema(DUPLICATES_SCHEMA) and dups.height == 3
    by_origin = {r["origin_id"]: r for r in dups.iter_rows(named=True)}
    assert by_origin[sid(samples, 0)]["duplicate_of_operation"] == "input"
    assert by_origin[sid(samples, 0)]["duplicate_of_origin_id"] == sid(samples, 4)
    assert by_origin[sid(samples, 6)]["duplicate_of_operation"] == "extended"
    assert by_origin[sid(samples, 6)]["duplicate_of_origin_id"] == sid(samples, 1)
    assert by_origin[sid(samples, 2)]["operation"] == "simplified"
    assert res.counts["duplicates_removed"] == 3
    fates = dict(zip(res.accounting["sample_id"], res.accounting["fate"]))
    assert fates[sid(samples, 0)] == "kept" and fates[sid(samples, 1)] == "kept+extended"
    assert fates[sid(samples, 2)] == "kept_duplicate" and fates[sid(samples, 6)] == "kept"
    statuses = dict(zip(res.accounting["sample_id"], res.accounting["extension_status"]))
    assert statuses[sid(samples, 0)] == "duplicate" and statuses[sid(samples, 6)] == "duplicate"
    # the sample-4 row stays the kept input row, not an extension
    assert ds.filter(pl.col("sample_id") == sid(samples, 4))["operation"].to_list() == ["kept"]


def extensions_everywhere(samples):
    return refined_table([refined_row(samples, i, "extended") for i in range(N)])


def test_size_policy_grow_adds_everything(samples):
    res = merge_round(samples, extensions_everywhere(samples), round_number=1, size_policy="grow")
    assert res.dataset.height == 2 * N and res.counts["dropped_by_size_policy"] == 0


def test_size_policy_keep_prefers_sparsest(samples):
    order = [sid(samples, i) for i in (7, 2, 9, 0, 5)]  # sparsest first; others unranked
    res = merge_round(
        samples, extensions_everywhere(samples), round_number=1, size_policy="keep", max_growth=0.2, sparse_order=order
    )
    ds = res.dataset
    assert ds.height == 12  # floor(10 * 1.2)
    ext_origins = ds.filter(pl.col("operation") == "extended")["origin_id"].to_list()
    assert ext_origins == [sid(samples, 2), sid(samples, 7)]  # the two sparsest, in row order
    assert res.counts["dropped_by_size_policy"] == 8
    status = dict(zip(res.accounting["sample_id"], res.accounting["extension_status"]))
    assert sum(v == "dropped_by_size_policy" for v in status.values()) == 8
    assert status[sid(samples, 7)] == "added" and status[sid(samples, 9)] == "dropped_by_size_policy"
    fates = dict(zip(res.accounting["sample_id"], res.accounting["fate"]))
    assert fates[sid(samples, 9)] == "kept" and fates[sid(samples, 7)] == "kept+extended"
    assert check_conservation(samples, ds, res.accounting) == []
    # without a ranking, input order decides; zero growth allows none
    res0 = merge_round(samples, extensions_everywhere(samples), round_number=1, size_policy="keep", max_growth=0.0)
    assert res0.dataset.height == N and res0.counts["dropped_by_size_policy"] == N
    res1 = merge_round(samples, extensions_everywhere(samples), round_number=1, size_policy="keep", max_growth=0.1)
    assert res1.dataset.filter(pl.col("operation") == "extended")["origin_id"].to_list() == [sid(samples, 0)]


def test_size_policy_keep_counts_replacements_as_one_for_one(samples):
    refined = refined_table(
        [refined_row(samples, i, "rewritten") for i in range(N)] + [refined_row(samples, 3, "extended")]
    )
    res = merge_round(samples, refined, round_number=1, size_policy="keep", max_growth=0.15)
    assert res.dataset.height == N + 1
    assert res.dataset.filter(pl.col("operation") == "kept").height == 0
    assert check_conservation(samples, res.dataset, res.accounting) == []


def test_empty_refined_keeps_everything(samples):
    res = merge_round(samples, pl.DataFrame(schema=REFINED_SCHEMA), round_number=4)
    assert res.dataset["sample_id"].to_list() == samples["sample_id"].to_list()
    assert res.dataset["operation"].unique().to_list() == ["kept"]
    assert res.accounting["fate"].unique().to_list() == ["kept"]
    assert check_conservation(samples, res.dataset, res.accounting) == []


def test_invalid_inputs(samples):
    with pytest.raises(ValueError, match="size_policy"):
        merge_round(samples, extensions_everywhere(samples), round_number=1, size_policy="shrink")
    two = refined_table([refined_row(samples, 1, "simplified"), refined_row(samples, 1, "rewritten")])
    with pytest.raises(ValueError, match="more than one"):
        merge_round(samples, two, round_number=1)
    stranger = refined_table([refined_row(samples, 1, "simplified")]).with_columns(origin_id=pl.lit("nobody"))
    with pytest.raises(ValueError, match="not in the input"):
        merge_round(samples, stranger, round_number=1)


def test_check_conservation_finds_problems(samples):
    refined = refined_table([refined_row(samples, 1, "simplified"), refined_row(samples, 2, "extended")])
    res = merge_round(samples, refined, round_number=1)
    ds, acc = res.dataset, res.accounting
    # a lost sample
    assert any("without an accounting row" in p for p in check_conservation(samples, ds, acc.slice(1)))
    # a kept row removed from the output
    lost = ds.filter(pl.col("sample_id") != sid(samples, 0))
    assert any("not in the output" in p for p in check_conservation(samples, lost, acc))
    # an orphan row
    orphan = pl.concat(
        [
            ds,
            make_samples(
                [{"instruction": "stray?", "input": "", "output": "x"}],
                round_number=1,
                operation="extended",
                origin_id="ghost",
            ),
        ]
    )
    assert any("not an input sample" in p for p in check_conservation(samples, orphan, acc))
    # a duplicated output row
    assert any("more than once" in p for p in check_conservation(samples, pl.concat([ds, ds.head(1)]), acc))
    # the replaced original still present
    back = pl.concat([ds, samples.slice(1, 1).with_columns(round=pl.lit(1, pl.Int64), operation=pl.lit("kept"))])
    assert any("still in the output" in p for p in check_conservation(samples, back, acc))


def test_end_to_end_with_run_operations(samples):
    """refined_samples from run_operations feeds merge_round directly."""
    from middo_pipeline.core.llm.protocol import Completion
    from middo_pipeline.core.optimizer.operations import plan_operations, run_operations
    from middo_pipeline.core.optimizer.prompts import PromptConfig

    class Echo:
        backend_id = "echo"

        def complete(self, requests, progress=None):
            out = []
            for r in requests:
                text = r.messages[-1][1]
                if r.prefill:
                    num = [w for w in text.split() if w.rstrip("?").isdigit()][0].rstrip("?")
                    out.append(Completion(text=f" A new easier question about {num}?"))
                else:
                    out.append(Completion(text=f"Answer to: {text}"))
            return out

    plan = plan_operations(
        samples,
        [sid(samples, 1)],
        [sid(samples, 1), sid(samples, 4)],
        [sid(samples, 6)],
        {sid(samples, 6): [sid(samples, 5)]},
    )
    refined = run_operations(
        samples, plan, {sid(samples, 6): [sid(samples, 5)]}, Echo(), PromptConfig(), round_number=1
    )
    assert refined["status"].to_list() == ["ok"] * 3
    res = merge_round(
        samples, refined, round_number=1, size_policy="keep", max_growth=0.15, sparse_order=[sid(samples, 6)]
    )
    assert schema_problems(res.dataset) == [] and check_conservation(samples, res.dataset, res.accounting) == []
    assert res.counts["rows_by_operation"] == {"kept": 8, "simplified": 0, "rewritten": 2, "extended": 1}


def test_rollback_restores_the_previous_data_and_accounts_for_every_row(samples):
    from middo_pipeline.core.rollback import rollback_round

    # D_r: round 2's merge of D_{r-1} (samples) with a simplification, a rewrite and two extensions
    refined = refined_table(
        [
            refined_row(samples, 1, "simplified"),
            refined_row(samples, 2, "rewritten"),
            refined_row(samples, 2, "extended"),
            refined_row(samples, 5, "extended"),
        ]
    )
    d_r = merge_round(samples, refined, round_number=2, size_policy="grow").dataset
    assert d_r.height == N + 2
    res = rollback_round(d_r, samples, round_number=3, reason="rollback: round-3's data trained a worse model")
    ds = res.dataset
    # D_{r+1} is D_{r-1} again, in its order, stamped as round 3's kept rows
    assert ds["sample_id"].to_list() == samples["sample_id"].to_list()
    assert ds.select("instruction", "input", "output").equals(samples.select("instruction", "input", "output"))
    assert ds["operation"].unique().to_list() == ["kept"] and ds["round"].unique().to_list() == [3]
    assert (ds["origin_id"] == ds["sample_id"]).all() and schema_problems(ds) == []
    assert check_conservation(d_r, ds, res.accounting) == []

    acc = {r["sample_id"]: r for r in res.accounting.iter_rows(named=True)}
    assert res.accounting["sample_id"].to_list() == d_r["sample_id"].to_list()
    new = d_r.filter(pl.col("operation") != "kept")
    assert sorted(new["operation"].to_list()) == ["extended", "extended", "rewritten", "simplified"]
    for row in new.iter_rows(named=True):
        a = acc[row["sample_id"]]
        assert a["fate"] == "withdrawn" and a["replacement_status"] == "rolled_back"
        assert a["replacement_operation"] == row["operation"]
        assert a["failure_reason"].startswith("rollback: ")
        assert a["replacement_id"] == (row["origin_id"] if row["operation"] != "extended" else None)
    assert sum(a["fate"] == "kept" for a in acc.values()) == N - 2
    c = res.counts
    json.dumps(c)
    assert c["rolled_back"] and c["withdrawn"] == 4 and c["restored"] == 2 and c["n_out"] == N
    assert c["withdrawn_by_operation"] == {"extended": 2, "rewritten": 1, "simplified": 1}

    # the conservation check sees a withdrawn row left in, or an original not restored
    extension = d_r.filter(pl.col("operation") == "extended").head(1).select(ds.columns)
    bad = pl.concat([ds, extension.cast(ds.schema)])
    assert any("withdrawn" in p for p in check_conservation(d_r, bad, res.accounting))
    missing = ds.filter(pl.col("sample_id") != sid(samples, 1))
    assert any("not restored" in p for p in check_conservation(d_r, missing, res.accounting))


def test_rollback_refuses_an_input_that_is_not_the_previous_data_plus_its_refinements(samples):
    from middo_pipeline.core.rollback import rollback_round

    d_r = merge_round(samples, refined_table([refined_row(samples, 1, "simplified")]), round_number=2).dataset
    with pytest.raises(ValueError, match="neither kept nor replaced"):
        rollback_round(d_r.filter(pl.col("origin_id") != sid(samples, 4)), samples, round_number=3, reason="r")
    with pytest.raises(ValueError, match="not in the previous round's dataset"):
        rollback_round(d_r, samples.filter(pl.col("sample_id") != sid(samples, 0)), round_number=3, reason="r")


def test_regression_verdict_rolls_back_only_beyond_the_training_order_noise_floor():
    import numpy as np

    from middo_pipeline.core.evaluation import compare_rounds
    from middo_pipeline.core.rollback import ROLLBACK_NOISE_FLOOR, regression_verdict

    rng = np.random.default_rng(0)
    ids = list(range(240))
    correct = rng.random(240) < 0.4
    loss = rng.random(240) + 1.0
    before = pl.DataFrame({"id": ids, "correct": correct, "loss": loss})
    made = pl.DataFrame({"operation": ["kept", "rewritten"]})

    def verdict(after_loss, after_correct=correct, rows=made, floor=None):
        after = pl.DataFrame({"id": ids, "correct": after_correct, "loss": after_loss})
        return regression_verdict(compare_rounds(before, after), rows, "round-3", "round-2", noise_floor=floor)

    # 0.01 nats worse on every item: "significant" by the item interval, but inside what
    # training order alone moves the loss by: not rolled back, and the reason says so
    small = verdict(loss + 0.01)
    assert small[0] is False and "noise floor" in small[1] and "not rolled back" in small[1]
    # with no floor the same change rolls back (significance alone)
    assert verdict(loss + 0.01, floor={"mc_accuracy": 0.0, "response_loss": 0.0})[0] is True
    # beyond the floor on loss: rolled back, naming the measure
    big = verdict(loss + 2 * ROLLBACK_NOISE_FLOOR["response_loss"])
    assert big[0] is True and big[1].startswith("rollback: round-3's data (1 rows made by round-2)")
    assert "beyond the noise floor: response_loss" in big[1]
    # MC accuracy 10 points worse (significantly) rolls back on its own
    worse_mc = correct.copy()
    worse_mc[np.flatnonzero(correct)[:24]] = False
    assert verdict(loss, worse_mc)[1].endswith("beyond the noise floor: mc_accuracy)")
    # better, or no row made by the previous round: nothing to roll back
    assert verdict(loss - 0.1)[0] is False
    kept_only = verdict(loss + 0.5, rows=pl.DataFrame({"operation": ["kept"]}))
    assert kept_only[0] is False and "nothing to withdraw" in kept_only[1]


def test_rollback_verdict_is_decided_once_from_the_two_evaluations_and_the_policy():
    import numpy as np

    from middo_pipeline.core.rollback import RollbackPolicy, rollback_verdict

    rng = np.random.default_rng(0)
    ids = list(range(240))
    correct = rng.random(240) < 0.4
    loss = rng.random(240) + 1.0
    before = pl.DataFrame({"id": ids, "correct": correct, "loss": loss})
    after = before.with_columns(pl.col("loss") + 0.5)
    made = pl.DataFrame({"operation": ["kept", "rewritten"]})

    first = rollback_verdict(None, None, made, "round-1", None)
    assert first.rollback is False and "nothing to compare with" in first.reason
    unevaluated = rollback_verdict(None, before, made, "round-3", "round-2")
    assert unevaluated.rollback is False and "was not evaluated" in unevaluated.reason
    worse = rollback_verdict(after, before, made, "round-3", "round-2")
    assert worse.rollback is True and worse.reason.startswith("rollback: round-3's data")
    kept = rollback_verdict(after, before, made, "round-3", "round-2", RollbackPolicy(on_regression="keep"))
    assert kept.rollback is False and kept.reason == f"merged anyway (on_regression: keep): {worse.reason}"
    lax = RollbackPolicy(noise_floor={"mc_accuracy": 1.0, "response_loss": 1.0})
    assert rollback_verdict(after, before, made, "round-3", "round-2", lax).rollback is False
    with pytest.raises(ValueError, match="on_regression"):
        RollbackPolicy(on_regression="maybe")


def test_quarantine_takes_out_only_unrepaired_samples_and_accounts_for_them(samples):
    """``quarantine``: a sample whose replacement the gate refused leaves the data and is kept,
    with its reason, in ``quarantined``; a failed call (no verdict) keeps its sample; an accepted
    replacement is merged as usual; an extension beside a quarantined sample stays."""
    rows = [
        refined_row(samples, 1, "simplified"),
        refined_row(samples, 2, "rewritten", ok=False, reason="verification: still low quality"),
        refined_row(samples, 2, "extended"),
        refined_row(samples, 4, "simplified", ok=False, reason="verification: still hard"),
        refined_row(samples, 6, "rewritten", ok=False, reason="llm error: timeout"),
    ]
    for r in rows:
        if r["failure_reason"] and r["failure_reason"].startswith("verification"):
            r["status"] = "rejected"
    refined = refined_table(rows)
    ids = unrepaired_ids(refined)
    assert ids == {sid(samples, 2), sid(samples, 4)}
    kept = merge_round(samples, refined, round_number=2, size_policy="grow")
    res = merge_round(samples, refined, round_number=2, size_policy="grow", quarantine=ids)
    assert check_conservation(samples, res.dataset, res.accounting) == []
    out = set(res.dataset["sample_id"].to_list())
    assert not ids & out and ids <= set(kept.dataset["sample_id"].to_list())
    assert sid(samples, 6) in out  # a failed call is no verdict on the sample
    assert res.dataset.height == kept.dataset.height - 2
    fates = dict(zip(res.accounting["sample_id"], res.accounting["fate"]))
    assert fates[sid(samples, 2)] == "quarantined+extended" and fates[sid(samples, 4)] == "quarantined"
    assert res.counts["quarantined"] == 2 and kept.counts["quarantined"] == 0
    q = res.quarantined.sort("sample_id")
    assert q.schema == pl.Schema(UNREPAIRED_SCHEMA)
    assert set(q["sample_id"]) == ids
    assert set(q["reason"]) == {"verification: still low quality", "verification: still hard"}
    # the quarantined rows are the input rows, whole: restorable as they were
    src = samples.filter(pl.col("sample_id").is_in(sorted(ids))).sort("sample_id")
    assert q.select("instruction", "input", "output").equals(src.select("instruction", "input", "output"))
    # conservation catches a quarantined sample left in the output
    leaked = pl.concat([res.dataset, samples.filter(pl.col("sample_id") == sid(samples, 4))])
    assert any("quarantined" in p for p in check_conservation(samples, leaked, res.accounting))
