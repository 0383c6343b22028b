"""Rollback: when a round's data trained a significantly worse model than the previous round's,
the next round gets the previous round's data again.

``rollback_verdict`` decides it once, from the two rounds' ``round_evaluation`` tables and a
``RollbackPolicy``; ``refined_samples`` (which then generates nothing) and ``optimized_dataset``
(which then calls ``rollback_round``) both ask it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, get_args

import polars as pl

from middo_pipeline.core.evaluation import compare_rounds
from middo_pipeline.core.merge import ACCOUNTING_SCHEMA, WITHDRAWN, MergeResult
from middo_pipeline.core.schema import EXTENDED, KEPT, REWRITTEN, SAMPLE_SCHEMA, SIMPLIFIED

OnRegression = Literal["rollback", "keep"]
ON_REGRESSION: tuple[str, ...] = get_args(OnRegression)
ROLLED_BACK = "rolled_back"  # replacement_status of a withdrawn row
_REPLACING = (SIMPLIFIED, REWRITTEN)

# How much worse a round's model must be, beyond significance, before its data is rolled back:
# the spread that training order alone gives (docs/decisions/rollback-floor.md).
ROLLBACK_NOISE_FLOOR = {"mc_accuracy": 0.02, "response_loss": 0.025}


def worse_beyond_floor(vs_prev: dict, noise_floor: dict[str, float] | None = None) -> list[str]:
    """The measures of ``core.evaluation.compare_rounds``'s result on which this round is
    significantly worse than the previous one by more than ``noise_floor`` (default
    ``ROLLBACK_NOISE_FLOOR``): what ``regression_verdict`` rolls back on."""
    floor = ROLLBACK_NOISE_FLOOR if noise_floor is None else noise_floor
    out = []
    for key in ("mc_accuracy", "response_loss"):
        m = vs_prev.get(key)
        if m and m.get("mean") is not None and m["significant"] and m["mean"] < -floor.get(key, 0.0):
            out.append(key)
    return out


def regression_verdict(
    vs_prev: dict | None,
    samples: pl.DataFrame,
    round_key: str,
    previous_key: str,
    noise_floor: dict[str, float] | None = None,
) -> tuple[bool, str]:
    """Whether D_r (``samples``, round ``round_key``'s input) is to be rolled back, and why, from
    ``core.evaluation.compare_rounds`` of the previous round's held-out items against this
    round's (None: no previous evaluation). Only when the model trained on D_r is worse than
    the one trained on D_{r-1} on a measure (``mc_accuracy``: this − previous; ``response_loss``:
    previous − this) both significantly (95% item interval below 0) and by more than that
    measure's ``noise_floor`` (default ``ROLLBACK_NOISE_FLOOR``: what training order alone moves
    it by), and D_r holds rows the previous round made: identical data has nothing to withdraw."""
    floor = ROLLBACK_NOISE_FLOOR if noise_floor is None else noise_floor
    if vs_prev is None:
        return False, f"no evaluation of {previous_key} to compare with"
    if not vs_prev.get("items"):
        return False, vs_prev.get("note") or f"no held-out item in common with {previous_key}"
    new = samples.filter(pl.col("operation").is_in(list(_REPLACING + (EXTENDED,)))).height
    figures = ", ".join(
        f"{name} {m['mean']:+.4f} [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"
        for name, m in (
            ("MC accuracy", vs_prev["mc_accuracy"]),
            ("response loss (previous - this)", vs_prev["response_loss"]),
        )
        if m and m.get("mean") is not None
    )
    if not vs_prev["worse"]:
        return False, f"{round_key}'s data trained a model not significantly worse than {previous_key}'s ({figures})"
    beyond = worse_beyond_floor(vs_prev, floor)
    floors = ", ".join(f"{key} {floor.get(key, 0.0):g}" for key in ("mc_accuracy", "response_loss"))
    if not beyond:
        return False, (
            f"{round_key}'s data trained a model significantly worse than {previous_key}'s by the item interval "
            f"({figures}), but by less than training order alone moves it (noise floor: {floors}): not rolled back"
        )
    if new == 0:
        return (
            False,
            f"{round_key} trained worse than {previous_key} ({figures}), but its data has no row the previous round made: nothing to withdraw",
        )
    return True, (
        f"rollback: {round_key}'s data ({new} rows made by {previous_key}) trained a significantly worse model than "
        f"{previous_key}'s data on the held-out items ({figures}; beyond the noise floor: {', '.join(beyond)})"
    )


def rollback_round(samples: pl.DataFrame, previous: pl.DataFrame, *, round_number: int, reason: str) -> MergeResult:
    """D_{r+1} = D_{r-1} (``previous``): the round's input D_r (``samples``) trained a worse
    model than D_{r-1}, so the rows the round before made (operation simplified, rewritten or
    extended in D_r) are withdrawn and the originals they replaced restored; this round's own
    refinements are not merged. Every row gets ``round_number`` and operation ``kept``.

    Raises ``ValueError`` when D_r is not D_{r-1} plus the previous round's operations (an
    edited table): a rollback must restore exactly the data that was evaluated before.
    """
    prev_ids = previous["sample_id"].to_list()
    prev_set = set(prev_ids)
    if len(prev_set) != len(prev_ids):
        raise ValueError("the previous round's dataset has duplicate sample_id values; cannot roll back to it")
    rows = list(samples.select("sample_id", "origin_id", "operation").iter_rows(named=True))
    kept = {r["sample_id"] for r in rows if r["operation"] not in _REPLACING + (EXTENDED,)}
    new = [r for r in rows if r["operation"] in _REPLACING + (EXTENDED,)]
    restored = {r["origin_id"] for r in new if r["operation"] in _REPLACING}
    problems = []
    if kept - prev_set:
        problems.append(f"{len(kept - prev_set)} kept rows are not in the previous round's dataset")
    if {r["origin_id"] for r in new} - prev_set:
        problems.append("refined rows whose origin is not in the previous round's dataset")
    if prev_set - kept - restored:
        problems.append(
            f"{len(prev_set - kept - restored)} rows of the previous round's dataset are neither kept nor replaced"
        )
    if problems:
        raise ValueError(
            "cannot roll back: this round's input is not the previous round's dataset plus its refinements ("
            + "; ".join(problems)
            + ")"
        )
    dataset = previous.select("sample_id", "instruction", "input", "output").with_columns(
        pl.col("sample_id").alias("origin_id"), pl.lit(KEPT).alias("operation"), pl.lit(round_number).alias("round")
    )
    dataset = pl.DataFrame(dataset.to_dicts(), schema=SAMPLE_SCHEMA)
    acc_rows = []
    for r in rows:
        a = dict.fromkeys(ACCOUNTING_SCHEMA)
        a["sample_id"] = r["sample_id"]
        if r["sample_id"] in kept:
            a["fate"] = "kept"
        else:
            a.update(
                fate=WITHDRAWN,
                replacement_operation=r["operation"],
                replacement_status=ROLLED_BACK,
                replacement_id=r["origin_id"] if r["operation"] in _REPLACING else None,
                failure_reason=reason,
            )
        acc_rows.append(a)
    accounting = pl.DataFrame(acc_rows, schema=ACCOUNTING_SCHEMA)
    withdrawn = Counter(r["operation"] for r in new)
    counts = {
        "n_in": samples.height,
        "n_out": dataset.height,
        "growth": round(dataset.height / max(samples.height, 1) - 1.0, 6),
        "rolled_back": True,
        "reason": reason,
        "withdrawn": len(new),
        "withdrawn_by_operation": dict(sorted(withdrawn.items())),
        "restored": len(restored),
        "fates": dict(sorted(Counter(accounting["fate"].to_list()).items())),
    }
    return MergeResult(dataset=dataset, accounting=accounting, counts=counts)


@dataclass(frozen=True)
class RollbackPolicy:
    """What a regression does: ``rollback`` (the default) or ``keep`` (merge as usual), and the
    noise floor per measure below which a significant regression is not acted on."""

    on_regression: OnRegression = "rollback"
    noise_floor: dict[str, float] = field(default_factory=lambda: dict(ROLLBACK_NOISE_FLOOR))

    def __post_init__(self):
        if self.on_regression not in ON_REGRESSION:
            raise ValueError(f"on_regression must be one of {ON_REGRESSION}, got {self.on_regression!r}")


@dataclass(frozen=True)
class RollbackVerdict:
    rollback: bool  # the merge hands on the previous round's data
    reason: str  # one sentence, shown in both assets' metadata
    noise_floor: dict[str, float]


def rollback_verdict(
    this_eval: pl.DataFrame | None,
    previous_eval: pl.DataFrame | None,
    samples: pl.DataFrame,
    round_key: str,
    previous_key: str | None,
    policy: RollbackPolicy = RollbackPolicy(),
) -> RollbackVerdict:
    """Whether round ``round_key``'s input ``samples`` (D_r) is rolled back, and why:
    ``regression_verdict`` on the two rounds' ``round_evaluation`` tables (None: not evaluated),
    then ``on_regression: keep`` overriding a rollback. ``previous_key`` None: the first round."""
    floor = dict(policy.noise_floor)
    if previous_key is None:
        return RollbackVerdict(False, "round-1 trains on the seed: nothing to compare with", floor)
    if this_eval is None:
        reason = f"{round_key} was not evaluated (round_evaluation): merged without the regression check"
        return RollbackVerdict(False, reason, floor)
    vs_prev = compare_rounds(previous_eval, this_eval) if previous_eval is not None else None
    rollback, reason = regression_verdict(vs_prev, samples, round_key, previous_key, noise_floor=floor)
    if rollback and policy.on_regression == "keep":
        return RollbackVerdict(False, f"merged anyway (on_regression: keep): {reason}", floor)
    return RollbackVerdict(rollback, reason, floor)
