"""Whether the nightly schedule should start the next round: a plain decision, tested directly."""

from __future__ import annotations

from dataclasses import dataclass

# Dagster run statuses by name (kept as strings so this module knows nothing of Dagster)
UNFINISHED = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING", "MANAGED"}
FAILED = {"FAILURE", "CANCELED"}


@dataclass(frozen=True)
class Decision:
    launch: bool
    round: int | None
    reason: str


def decide_next_round(
    rounds: list[int],
    latest_run_status: str | None,
    latest_round_complete: bool,
    seed_ready: bool,
    max_rounds: int | None = None,
) -> Decision:
    """``rounds``: existing round numbers; the other facts are about the latest of them.

    - no rounds yet: start round 1 (when the seed is materialized);
    - latest round still running: skip;
    - latest round complete (its optimized_dataset exists): start the next one;
    - latest round failed or cancelled: skip — a person must look first;
    - latest round exists but never ran: start it.
    """
    if not seed_ready:
        return Decision(False, None, "seed_dataset is not materialized yet: materialize it (UI or `middo loop`) first")
    if not rounds:
        return Decision(True, 1, "no rounds yet: starting round-1")
    r = max(rounds)
    if latest_run_status in UNFINISHED:
        return Decision(False, None, f"round-{r} is still running ({latest_run_status}); the next round waits")
    if latest_round_complete:
        if max_rounds is not None and r >= max_rounds:
            return Decision(False, None, f"round-{r} complete and max_rounds={max_rounds} reached")
        return Decision(True, r + 1, f"round-{r} complete: starting round-{r + 1}")
    if latest_run_status in FAILED:
        return Decision(
            False, None, f"round-{r}'s last run ended {latest_run_status}: fix it and re-run round-{r}; the loop waits"
        )
    if latest_run_status is None:
        return Decision(True, r, f"round-{r} was added but never ran: starting it")
    return Decision(
        False, None, f"round-{r} finished ({latest_run_status}) without an optimized_dataset: re-run round-{r}"
    )
