"""Whether the nightly schedule should start the next round: a plain decision, tested directly."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

# Dagster run statuses by name (kept as strings so this module knows nothing of Dagster)
UNFINISHED = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING", "MANAGED"}
FAILED = {"FAILURE", "CANCELED"}


@dataclass(frozen=True)
class Decision:
    launch: bool
    round: int | None
    reason: str


# complete rounds in a row that left the data as they found it, after which the nightly
# schedule stops starting rounds (``MIDDO_STALL_ROUNDS``; 0 never stops): with a weak
# optimizer every round's candidates can fail the gate, and each further night then spends
# its optimizer time (about 5 minutes on the 2-core default) on the same flagged samples. The
# sampling seed moves with the round, so a new draw may pass: three chances, not one.
STALL_ROUNDS = 3


def stall_rounds() -> int:
    """``MIDDO_STALL_ROUNDS`` (default ``STALL_ROUNDS``; 0: never stop)."""
    raw = os.environ.get("MIDDO_STALL_ROUNDS", "").strip()
    if not raw:
        return STALL_ROUNDS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"MIDDO_STALL_ROUNDS must be a whole number of rounds (0: never stop), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"MIDDO_STALL_ROUNDS must be 0 or more, got {value}")
    return value


def unchanged_streak(changed_newest_first: Iterable[bool | None]) -> int:
    """How many of the latest complete rounds in a row left the data unchanged.
    ``changed_newest_first`` is per complete round, newest first (read lazily: a generator
    stops being read at the first round that breaks the streak): True (the round's data
    differs from what it started from), False (the same rows in the same order: the gate
    accepted nothing, or the round was rolled back), None (not known: counts as changed, so
    the streak stops there)."""
    n = 0
    for c in changed_newest_first:
        if c is not False:
            break
        n += 1
    return n


def decide_next_round(
    rounds: list[int],
    latest_run_status: str | None,
    latest_round_complete: bool,
    seed_ready: bool,
    max_rounds: int | None = None,
    unchanged_rounds: int = 0,
    stall_rounds: int | None = STALL_ROUNDS,
) -> Decision:
    """``rounds``: existing round numbers; the other facts are about the latest of them, and
    ``unchanged_rounds`` is ``unchanged_streak`` of the complete rounds.

    - no rounds yet: start round 1 (when the seed is materialized);
    - latest round still running: skip;
    - latest round complete (its optimized_dataset exists): start the next one, unless
      ``max_rounds`` is reached or the last ``stall_rounds`` rounds all left the data unchanged
      (the loop has stalled: skip, saying how to go on);
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
        if stall_rounds and unchanged_rounds >= stall_rounds:
            first = r - unchanged_rounds + 1
            return Decision(
                False,
                None,
                f"the loop has stalled: round-{first} to round-{r} ({unchanged_rounds} rounds) each left the data "
                "unchanged (the gate accepted no refinement, or the round was rolled back), so another round would "
                "spend its optimizer time on the same flagged samples. Use a stronger optimizer "
                "(MIDDO_OPTIMIZER_BACKEND=openai) or another acceptance bar, launch a round by hand to try once "
                f"more, or set MIDDO_STALL_ROUNDS=0 (now {stall_rounds}) to keep starting rounds",
            )
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
