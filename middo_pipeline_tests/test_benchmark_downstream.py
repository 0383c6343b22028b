"""The downstream benchmark's variants are built from the same candidates, and its paired
statistic is right (the benchmark itself is too long for the suite)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from benchmarks.downstream import build_variants, paired
from middo_pipeline.core.schema import make_sample_id, make_samples

ROWS = [{"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}."} for i in range(20)]


def _cand(origin, op, c, status, passed, q):
    ins, out = f"New prompt for {origin} {op} {c}", f"New answer {c}."
    return {
        "origin_id": origin,
        "operation": op,
        "candidate": c,
        "flags": op,
        "status": status,
        "failure_reason": None if status == "ok" else "empty response",
        "instruction_before": "x",
        "input_before": "",
        "output_before": "y",
        "instruction_after": ins if status == "ok" else None,
        "input_after": "" if status == "ok" else None,
        "output_after": out if status == "ok" else None,
        "new_sample_id": make_sample_id(ins, "", out) if status == "ok" else None,
        "passed": passed,
        "reasons": None if passed else "still hard",
        "quality_value": q,
        "loss_after": 1.0,
    }


def test_variants_share_the_candidates():
    seed = make_samples(ROWS)
    ids = seed["sample_id"].to_list()
    cands = pl.DataFrame(
        [
            _cand(ids[0], "simplified", 0, "ok", False, 1.0),
            _cand(ids[0], "simplified", 1, "ok", True, 2.0),
            _cand(ids[1], "rewritten", 0, "ok", False, 1.0),
            _cand(ids[1], "rewritten", 1, "failed", False, None),
            _cand(ids[2], "extended", 0, "ok", True, 3.0),
            _cand(ids[2], "extended", 1, "ok", True, 1.0),
        ]
    )
    v = build_variants(seed, cands, sparse_order=[ids[2]])
    assert set(v) == {"seed", "gate_on", "gate_off", "seed_reshuffled", "simplify_only", "rewrite_only", "extend_only"}
    assert v["seed"][0].equals(seed)
    placebo = v["seed_reshuffled"][0]  # the same rows, another order
    assert placebo.sort("sample_id").equals(seed.sort("sample_id"))
    on, off = v["gate_on"][0], v["gate_off"][0]
    # gate on: candidate 1 replaces sample 0, the rewrite is rejected (sample 1 kept), candidate 0 extends sample 2
    assert ids[0] not in on["sample_id"].to_list() and ids[1] in on["sample_id"].to_list()
    assert "New prompt for " + ids[0] + " simplified 1" in on["instruction"].to_list()
    assert "New prompt for " + ids[2] + " extended 0" in on["instruction"].to_list()
    # gate off: every first candidate that was generated is taken, passed or not
    assert "New prompt for " + ids[0] + " simplified 0" in off["instruction"].to_list()
    assert ids[1] not in off["sample_id"].to_list()
    assert v["gate_on"][1]["accepted"] == 2 and v["gate_off"][1]["accepted"] == 3
    assert v["simplify_only"][1]["accepted"] == 1 and v["rewrite_only"][1]["accepted"] == 0
    assert v["extend_only"][0].height == seed.height + 1


def test_default_bar_outcome_rejudges_the_stored_candidates_with_the_round_medians():
    """What the default bar (auto: typical for the benchmark's 135M optimizer) would accept is
    judged from the stored signals: a candidate that passed the flag rule but is harder after
    training than the round's median sample is not accepted; one at least as good is."""
    from benchmarks.downstream import default_bar_outcome

    seed = make_samples(ROWS)
    ids = seed["sample_id"].to_list()
    rows = [
        _cand(ids[0], "simplified", 0, "ok", True, 2.0) | {"loss_after": 3.0},  # unflagged, harder than typical
        _cand(ids[1], "simplified", 0, "ok", True, 2.0) | {"loss_after": 1.0},  # at least typical on both
        _cand(ids[2], "simplified", 0, "ok", False, 2.0) | {"loss_after": 1.0},  # rejected by the flag rule
    ]
    cands = pl.DataFrame([r | {"loss_before": 1.0, "quality_value_original": 0.0, "max_cosine": 0.5} for r in rows])
    loss = pl.DataFrame({"sample_id": ids, "loss_after": [1.0 + 0.1 * i for i in range(20)]}).with_columns(
        pl.lit(9.0).alias("threshold_loss_before"), pl.lit(9.0).alias("threshold_loss_after")
    )
    quality = pl.DataFrame({"sample_id": ids, "quality_value": [float(i % 3) for i in range(20)]}).with_columns(
        pl.lit(-1.0).alias("quality_threshold")
    )
    got = default_bar_outcome(cands, loss, quality)
    assert got["bar"] == "typical" and got["typical_loss_after"] == 1.95 and got["typical_quality"] == 1.0
    assert got["candidates_passed"] == 1 and got["accepted"] == 1
    assert got["accepted_by_operation"] == {"simplified": 1}


def test_paired_mean_and_interval():
    a, b = np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0, 0.0])
    res = paired(a, b, n_boot=500)
    assert res["mean"] == 0.5 and res["items"] == 4 and res["ci95"][0] <= 0.5 <= res["ci95"][1]
    same = paired(a, a)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0] and not same["significant"]
    assert paired(np.array([np.nan]), np.array([1.0]))["mean"] is None


def test_run_cache_key_is_the_data_and_the_training(tmp_path):
    import polars as pl

    from benchmarks.common import Settings
    from benchmarks.downstream import _run_cache_file
    from middo_pipeline.core.training import TrainConfig

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"a": 1}\n')
    df = pl.DataFrame({"sample_id": ["a", "b", "c"]})
    st = Settings.quick(down_run_cache=str(tmp_path / "runs"))
    one = _run_cache_file(st, df, TrainConfig(seed=0), eval_file)
    assert one == _run_cache_file(st, df, TrainConfig(seed=0), eval_file) and one.parent == tmp_path / "runs"
    assert one != _run_cache_file(st, df.reverse(), TrainConfig(seed=0), eval_file)  # order is part of the data
    assert one != _run_cache_file(st, df, TrainConfig(seed=1), eval_file)
    eval_file.write_text('{"a": 2}\n')
    assert one != _run_cache_file(st, df, TrainConfig(seed=0), eval_file)
    assert _run_cache_file(Settings.quick(down_run_cache=None), df, TrainConfig(seed=0), eval_file) is None


def test_summary_carries_item_and_run_intervals():
    from benchmarks.downstream import _summarize

    rng = np.random.default_rng(0)
    names = ("seed", "gate_on", "gate_off", "seed_reshuffled")
    correct = {n: [(rng.random(50) < 0.5).astype(float) for _ in range(3)] for n in names}
    losses = {n: [rng.random(50) + 1 for _ in range(3)] for n in names}
    runs = {
        n: [{"mc_accuracy": float(c.mean()), "mean_response_loss": 1.0, "rows": 9, "steps": 3} for c in correct[n]]
        for n in names
    }
    got = _summarize(runs, correct, losses)
    on = got["variants"]["gate_on"]
    items, both = on["mc_accuracy_diff_vs_seed"], on["mc_accuracy_diff_vs_seed_runs_items"]
    assert abs(items["mean"] - both["mean"]) < 1e-12 and both["runs"] == [3, 3]
    assert both["ci95"][1] - both["ci95"][0] > items["ci95"][1] - items["ci95"][0]  # runs add spread
    assert got["downstream_mc_accuracy_diff_ci_runs_items"] == both["ci95"]
    assert (
        got["downstream_placebo_diff_ci_runs_items"]
        == got["variants"]["seed_reshuffled"]["mc_accuracy_diff_vs_seed_runs_items"]["ci95"]
    )
    off = got["variants"]["gate_off"]["mc_accuracy_diff_vs_seed_runs_items"]["ci95"]
    assert got["downstream_gate_off_diff_ci_runs_items"] == off
    loss = on["response_loss_improvement_vs_seed_runs_items"]  # seed − variant: > 0 better
    assert abs(loss["mean"] - (np.mean(losses["seed"]) - np.mean(losses["gate_on"]))) < 1e-12


def test_rollback_by_seed_is_the_pipelines_rule_run_by_run():
    from benchmarks.downstream import rollback_by_seed

    rng = np.random.default_rng(1)
    seed_c = [(rng.random(200) < 0.5).astype(float) for _ in range(3)]
    seed_l = [rng.random(200) + 1 for _ in range(3)]
    # run 0 the same as the seed's, run 1 much worse in loss, run 2 much better in both
    var_c = [seed_c[0], seed_c[1], np.ones(200)]
    var_l = [seed_l[0], seed_l[1] + 0.5, seed_l[2] - 0.5]
    got = rollback_by_seed(seed_c, seed_l, var_c, var_l)
    assert got == {
        "by_seed": [False, True, False],
        "fired": 1,
        "of": 3,
        "rules": {"pipeline": 1, "either": 1, "both": 0, "mc": 0, "loss": 1},
    }
    # a run much worse in both measures fires every rule
    worse_both = rollback_by_seed(seed_c[:1], seed_l[:1], [np.zeros(200)], [seed_l[0] + 0.5])
    assert worse_both["rules"] == {"pipeline": 1, "either": 1, "both": 1, "mc": 1, "loss": 1}
    # a loss 0.01 worse on every item is significant but inside the noise floor: only the
    # pipeline's rule holds back
    small = rollback_by_seed(seed_c[:1], seed_l[:1], [seed_c[0]], [seed_l[0] + 0.01])
    assert small["rules"] == {"pipeline": 0, "either": 1, "both": 0, "mc": 0, "loss": 1}
    # on a subset of the items: the same rule on fewer items (the pipeline's default held-out set)
    mask = np.arange(200) < 66
    var_l[2] = np.where(mask, seed_l[2] + 0.5, seed_l[2] - 0.5)  # worse on the subset, better on the rest
    got = rollback_by_seed(seed_c, seed_l, var_c, var_l, subset=mask)
    assert got["pipeline_eval"] == {
        "items": 66,
        "by_seed": [False, True, True],
        "fired": 2,
        "rules": {"pipeline": 2, "either": 2, "both": 0, "mc": 0, "loss": 2},
    }


def test_pipeline_eval_mask_marks_the_default_held_out_items_in_id_order():
    from benchmarks.downstream import DOWN_EVAL, PIPELINE_EVAL, pipeline_eval_mask
    from middo_pipeline.core.evaluation import load_eval_set

    large = load_eval_set(DOWN_EVAL)
    mask = pipeline_eval_mask(large)
    small = set(load_eval_set(PIPELINE_EVAL)["id"].to_list())
    ids = sorted(large["id"].to_list())
    assert mask.sum() == len(small) == 66 and {i for i, m in zip(ids, mask) if m} == small


def test_rollback_null_counts_every_ordered_pair_of_runs_of_the_same_rows():
    from benchmarks.downstream import rollback_null

    rng = np.random.default_rng(2)
    c = (rng.random(200) < 0.5).astype(float)
    l0 = rng.random(200) + 1
    # runs 0 and 1 the same; runs 2 and 3 much worse in loss: of the 12 ordered pairs, the 4
    # from a good run to a bad one fire (the rollback rule reads "this round worse")
    correct = [c, c, c, c]
    loss = [l0, l0, l0 + 0.5, l0 + 0.5]
    got = rollback_null(correct, loss, subset=np.arange(200) < 66, n_boot=200)
    assert got["runs"] == 4 and got["pairs"] == 12
    pipe = got["rules"]["pipeline"]
    assert pipe["fired"] == 4 and pipe["rate"] == pytest.approx(4 / 12)
    assert pipe["ci95"][0] <= 4 / 12 <= pipe["ci95"][1]
    # disjoint pairs: 0 before 1 (same: no), 2 before 3 (same: no)
    assert pipe["disjoint_pairs"]["fired"] == 0 and pipe["disjoint_pairs"]["of"] == 2
    assert pipe["disjoint_pairs"]["ci95"][0] == 0.0 and 0.5 < pipe["disjoint_pairs"]["ci95"][1] < 1.0
    assert got["rules"]["mc"]["fired"] == 0 and got["rules"]["loss"]["fired"] == 4
    assert got["pipeline_eval"]["items"] == 66 and got["pipeline_eval"]["rules"]["pipeline"]["fired"] == 4
    # runs that differ by nothing: no rule fires, and the interval says so
    same = rollback_null([c] * 3, [l0] * 3, n_boot=100)
    assert all(v["fired"] == 0 and v["ci95"] == [0.0, 0.0] for v in same["rules"].values())
    assert rollback_null([c], [l0])["pairs"] == 0
