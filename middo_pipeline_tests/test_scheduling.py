"""The nightly schedule's decision, as a plain function and through Dagster's schedule context."""

import pytest
from dagster import AssetMaterialization, RunRequest, SkipReason, build_schedule_context, instance_for_test

from middo_pipeline.core.scheduling import STALL_ROUNDS, decide_next_round, stall_rounds, unchanged_streak
from middo_pipeline.loop import round_warnings
from middo_pipeline.rounds import ROUNDS, round_key
from middo_pipeline.schedules import nightly_round


def test_no_seed_skips():
    d = decide_next_round([], None, False, seed_ready=False)
    assert not d.launch and "seed_dataset" in d.reason


def test_first_round():
    d = decide_next_round([], None, False, seed_ready=True)
    assert d.launch and d.round == 1


def test_previous_round_finished_launches_next():
    d = decide_next_round([1, 2], "SUCCESS", True, seed_ready=True)
    assert d.launch and d.round == 3


def test_previous_round_still_running_skips():
    for status in ("STARTED", "QUEUED", "STARTING"):
        d = decide_next_round([1, 2], status, False, seed_ready=True)
        assert not d.launch and "still running" in d.reason and "round-2" in d.reason


def test_previous_round_failed_skips_with_reason():
    d = decide_next_round([1], "FAILURE", False, seed_ready=True)
    assert not d.launch and "FAILURE" in d.reason and "round-1" in d.reason


def test_added_but_never_ran_starts_it():
    d = decide_next_round([1], None, False, seed_ready=True)
    assert d.launch and d.round == 1


def test_max_rounds_stops():
    d = decide_next_round([3], "SUCCESS", True, seed_ready=True, max_rounds=3)
    assert not d.launch and "max_rounds" in d.reason


def test_unchanged_streak_counts_the_latest_rounds_only():
    # newest round first
    assert unchanged_streak([]) == 0
    assert unchanged_streak([False, False, True]) == 2
    assert unchanged_streak([True, False, False]) == 0
    # not known (a round without recorded fingerprints) stops the streak
    assert unchanged_streak([False, None, False]) == 1
    assert unchanged_streak([False, False, False]) == 3
    # read lazily: nothing past the round that breaks the streak
    seen = []
    assert unchanged_streak(seen.append(c) or c for c in [False, True, False, False]) == 1
    assert seen == [False, True]


def test_a_stalled_loop_is_not_continued_by_the_schedule():
    d = decide_next_round([1, 2, 3], "SUCCESS", True, seed_ready=True, unchanged_rounds=3, stall_rounds=3)
    assert not d.launch and d.round is None
    assert "stalled" in d.reason and "round-1 to round-3" in d.reason and "MIDDO_STALL_ROUNDS=0" in d.reason
    # one round short of the limit, or the rule off: the next round starts
    assert decide_next_round([1, 2, 3], "SUCCESS", True, seed_ready=True, unchanged_rounds=2, stall_rounds=3).launch
    d = decide_next_round([1, 2, 3], "SUCCESS", True, seed_ready=True, unchanged_rounds=3, stall_rounds=0)
    assert d.launch and d.round == 4
    # the default is the module's
    assert not decide_next_round([4], "SUCCESS", True, seed_ready=True, unchanged_rounds=STALL_ROUNDS).launch


def test_stall_rounds_setting(monkeypatch):
    monkeypatch.delenv("MIDDO_STALL_ROUNDS", raising=False)
    assert stall_rounds() == STALL_ROUNDS
    monkeypatch.setenv("MIDDO_STALL_ROUNDS", "0")
    assert stall_rounds() == 0
    for bad in ("three", "-1"):
        monkeypatch.setenv("MIDDO_STALL_ROUNDS", bad)
        with pytest.raises(ValueError, match="MIDDO_STALL_ROUNDS"):
            stall_rounds()


def _tick(instance):
    # a schedule context enters the instance (and with it Dagster's current defs-state storage):
    # used outside ``with`` it never leaves, and a later test resolving definitions finds a
    # dead instance behind that storage
    with build_schedule_context(instance=instance) as ctx:
        return nightly_round(ctx)


def test_schedule_on_instance(tmp_path):
    with instance_for_test() as instance:
        assert isinstance(_tick(instance), SkipReason)  # no seed yet

        instance.report_runless_asset_event(AssetMaterialization("seed_dataset"))
        out = _tick(instance)
        assert isinstance(out, RunRequest) and out.partition_key == "round-1"
        assert instance.has_dynamic_partition(ROUNDS, "round-1")

        # round-1 exists, never ran -> start it; once its optimized_dataset exists -> round-2
        instance.report_runless_asset_event(AssetMaterialization("optimized_dataset", partition="round-1"))
        out = _tick(instance)
        assert isinstance(out, RunRequest) and out.partition_key == "round-2"
        assert instance.has_dynamic_partition(ROUNDS, "round-2")


def _round(instance, n: int, before: str, after: str) -> None:
    """Round n recorded as complete, its data going from fingerprint ``before`` to ``after``."""
    key = round_key(n)
    instance.add_dynamic_partitions(ROUNDS, [key])
    instance.report_runless_asset_event(
        AssetMaterialization("round_dataset", partition=key, metadata={"fingerprint": before})
    )
    instance.report_runless_asset_event(
        AssetMaterialization("optimized_dataset", partition=key, metadata={"fingerprint": after})
    )


def test_schedule_stops_a_loop_whose_data_stopped_changing(monkeypatch):
    monkeypatch.delenv("MIDDO_STALL_ROUNDS", raising=False)
    with instance_for_test() as instance:
        instance.report_runless_asset_event(AssetMaterialization("seed_dataset"))
        _round(instance, 1, "aaa", "bbb")  # round-1 changed the data
        _round(instance, 2, "bbb", "bbb")
        _round(instance, 3, "bbb", "bbb")
        out = _tick(instance)  # two unchanged rounds: one more chance
        assert isinstance(out, RunRequest) and out.partition_key == "round-4"
        notes = [w for w in round_warnings(instance, "round-3") if "unchanged for" in w]
        assert len(notes) == 1 and "2 rounds in a row (round-2 to round-3)" in notes[0]
        assert not [w for w in round_warnings(instance, "round-2") if "unchanged for" in w]

        _round(instance, 4, "bbb", "bbb")
        out = _tick(instance)
        assert isinstance(out, SkipReason) and "stalled" in out.skip_message
        assert "round-2 to round-4" in out.skip_message
        assert not instance.has_dynamic_partition(ROUNDS, "round-5")

        monkeypatch.setenv("MIDDO_STALL_ROUNDS", "0")
        out = _tick(instance)
        assert isinstance(out, RunRequest) and out.partition_key == "round-5"
        assert any("MIDDO_STALL_ROUNDS=0" in w for w in round_warnings(instance, "round-4"))
        monkeypatch.setenv("MIDDO_STALL_ROUNDS", "4")
        instance.delete_dynamic_partition(ROUNDS, "round-5")
        assert isinstance(_tick(instance), RunRequest)  # 3 unchanged < 4


def test_a_round_that_changed_the_data_restarts_the_count(monkeypatch):
    monkeypatch.delenv("MIDDO_STALL_ROUNDS", raising=False)
    with instance_for_test() as instance:
        instance.report_runless_asset_event(AssetMaterialization("seed_dataset"))
        for n, (a, b) in enumerate([("s", "s"), ("s", "s"), ("s", "t"), ("t", "t"), ("t", "t")], start=1):
            _round(instance, n, a, b)
        out = _tick(instance)
        assert isinstance(out, RunRequest) and out.partition_key == "round-6"
