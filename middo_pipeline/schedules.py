"""The nightly schedule: add the next round partition and launch it once the previous round finished
(unless the loop has stalled: see ``core.scheduling.STALL_ROUNDS``)."""

import os

from dagster import AssetKey, RunRequest, RunsFilter, ScheduleEvaluationContext, SkipReason, schedule

from middo_pipeline.core.scheduling import decide_next_round, stall_rounds, unchanged_streak
from middo_pipeline.jobs import ROUND_JOB, round_job
from middo_pipeline.rounds import ROUNDS, data_changed, existing_rounds, latest_materialization, round_key

NIGHTLY_CRON = os.environ.get("MIDDO_NIGHTLY_CRON", "0 2 * * *")
MAX_ROUNDS = int(os.environ["MIDDO_MAX_ROUNDS"]) if os.environ.get("MIDDO_MAX_ROUNDS") else None


def next_round_decision(instance):
    rounds = existing_rounds(instance)
    status, complete = None, False
    if rounds:
        key = round_key(max(rounds))
        runs = instance.get_runs(RunsFilter(job_name=ROUND_JOB, tags={"dagster/partition": key}), limit=1)
        status = runs[0].status.value if runs else None
        complete = latest_materialization(instance, "optimized_dataset", key) is not None
    seed_ready = instance.get_latest_materialization_event(AssetKey("seed_dataset")) is not None
    stall = stall_rounds()
    unchanged = 0
    if complete and stall:
        # newest first, only as far back as the streak can matter
        unchanged = unchanged_streak(data_changed(instance, round_key(n)) for n in sorted(rounds, reverse=True)[:stall])
    return decide_next_round(rounds, status, complete, seed_ready, MAX_ROUNDS, unchanged, stall)


@schedule(
    job=round_job,
    cron_schedule=NIGHTLY_CRON,
    description=(
        "Each night: start the next Middo round if the previous one finished, unless the last "
        "MIDDO_STALL_ROUNDS (default 3) rounds each left the data unchanged (cron from MIDDO_NIGHTLY_CRON)."
    ),
)
def nightly_round(context: ScheduleEvaluationContext):
    decision = next_round_decision(context.instance)
    if not decision.launch:
        return SkipReason(decision.reason)
    key = round_key(decision.round)
    if not context.instance.has_dynamic_partition(ROUNDS, key):
        context.instance.add_dynamic_partitions(ROUNDS, [key])
    return RunRequest(run_key=f"{key}", partition_key=key, tags={"middo/reason": decision.reason})
