"""The nightly schedule's decision, as a plain function and through Dagster's schedule context."""

from dagster import AssetMaterialization, RunRequest, SkipReason, build_schedule_context, instance_for_test

from middo_pipeline.core.scheduling import decide_next_round
from middo_pipeline.rounds import ROUNDS
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
