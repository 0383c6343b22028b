"""Verified refinement: every optimizer output is a candidate, accepted only when the round's
own signals (its models, its stored thresholds) say it fixed the defect that flagged it and
brought no new one. The rules and their margins: docs/decisions/gate-rules.md; the rules read
off the text alone are in ``text_rules``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from middo_pipeline.core.schema import EXTENDED, REWRITTEN, SIMPLIFIED
from middo_pipeline.core.text_rules import DEFAULT_NGRAM, text_reasons

__all__ = [
    "GateRules",
    "DEFAULT_RULES",
    "RoundThresholds",
    "QualityScale",
    "quality_value",
    "base_reasons",
    "verify_candidates",
    "choose_candidates",
    "CANDIDATE_SIGNAL_COLUMNS",
]

# the gate's margins (docs/decisions/gate-rules.md has the figures behind each)
DEFAULT_DUPLICATE_COSINE = 0.9  # the earlier near-duplicate rule, kept for the gate benchmark's variant
DEFAULT_SAME_TASK_COSINE = 0.5  # a same-task sample this similar is a near-duplicate
DEFAULT_NEW_TASK_GAIN = 0.0  # nats per token each prompt must explain its own answer by
DEFAULT_REPAIR_GAIN = 0.2  # nats per token a repair's prompt must explain its origin's answer better by
DEFAULT_MAX_IFD = 0.95  # a candidate at or above this IFD is rejected
DEFAULT_MAX_FLUENCY_LOSS = 3.0  # nats per token a new prompt may read worse than its origin's

# what the re-scoring adds to each candidate row
CANDIDATE_SIGNAL_COLUMNS = (
    "loss_before",
    "loss_after",
    "loss_unconditional",
    "ifd",
    "judge_score",
    "quality_value",
    "max_cosine",
    "max_cosine_same_task",
    "cosine_original",
    "new_task_gain",
    "repair_gain",
    "prompt_fluency_gain",
)


@dataclass(frozen=True)
class QualityScale:
    """How the round turned its quality readings into one value (higher is better), stored so
    that candidates are measured on the same scale as the round's samples.

    ``mode``: ``judge`` (the self-judged 0–10 score), ``ifd`` (minus the instruction-following
    difficulty), ``combined`` (the mean of the two, each standardised with the round's mean and
    standard deviation)."""

    mode: str
    judge_mean: float = float("nan")
    judge_std: float = float("nan")
    ifd_mean: float = float("nan")
    ifd_std: float = float("nan")

    @staticmethod
    def fit(mode: str, judge: np.ndarray | None, ifd: np.ndarray | None) -> QualityScale:
        def stats(x):
            if x is None:
                return float("nan"), float("nan")
            x = np.asarray(x, dtype=np.float64)
            x = x[np.isfinite(x)]
            return (float(x.mean()), float(x.std())) if x.size else (float("nan"), float("nan"))

        jm, js = stats(judge)
        im, is_ = stats(ifd)
        return QualityScale(mode, jm, js, im, is_)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "judge_mean": self.judge_mean,
            "judge_std": self.judge_std,
            "ifd_mean": self.ifd_mean,
            "ifd_std": self.ifd_std,
        }


def quality_value(scale: QualityScale, judge: np.ndarray | None, ifd: np.ndarray | None) -> np.ndarray:
    """One quality value per sample, higher is better; NaN when its readings are missing."""
    if scale.mode == "judge":
        return np.asarray(judge, dtype=np.float64)
    if scale.mode == "ifd":
        return -np.asarray(ifd, dtype=np.float64)
    if scale.mode == "combined":
        j = (np.asarray(judge, dtype=np.float64) - scale.judge_mean) / (scale.judge_std or 1.0)
        f = (np.asarray(ifd, dtype=np.float64) - scale.ifd_mean) / (scale.ifd_std or 1.0)
        return (j - f) / 2.0
    raise ValueError(f"quality mode must be judge, ifd or combined, got {scale.mode!r}")


# How good an accepted candidate must be. "flag" (the method's rule): it no longer carries the
# flag it was made to fix and gets no new one. "typical" (conservative, for a weak optimizer):
# also no harder after training than the round's median sample and of at least its median
# quality, so that nothing below the round's typical row gets in (a small optimizer's
# refinements that pass "flag" are mostly worse than typical seed rows: docs/decisions/acceptance-bar.md).
ACCEPTANCE_BARS = ("flag", "typical")


def resolve_acceptance_bar(bar: str, optimizer_style: str) -> str:
    """The bar ``auto`` stands for: ``typical`` for an optimizer that cannot follow the stepwise
    prompt (a small model: ``optimizer.style.choose_style`` says ``direct``), ``flag`` for one
    that can. Any other bar is returned as it is (and checked)."""
    if bar == "auto":
        return "flag" if optimizer_style == "stepwise" else "typical"
    if bar not in ACCEPTANCE_BARS:
        raise ValueError(f"acceptance bar must be auto or one of {', '.join(ACCEPTANCE_BARS)}, got {bar!r}")
    return bar


@dataclass(frozen=True, kw_only=True)
class GateRules:
    """The gate's rule settings (``RefineConfig``'s, one field each), apart from the round's own
    thresholds: which rules apply and their margins."""

    # with duplicate_same_task off: an extension this similar to any round sample is a duplicate
    duplicate_cosine: float = DEFAULT_DUPLICATE_COSINE
    # True: a near-duplicate is a sample that reads as the same task (``same_task``) at
    # ``same_task_cosine`` or more; False: any sample at ``duplicate_cosine`` or more
    duplicate_same_task: bool = True
    same_task_cosine: float = DEFAULT_SAME_TASK_COSINE
    # an extension must be a new task, not its origin's task again (``new_task_gain`` above
    # ``new_task_gain``, where the candidates table has it)
    new_task: bool = True
    new_task_gain: float = DEFAULT_NEW_TASK_GAIN
    # a candidate must be at least as close to its origin as the origin's neighbours are
    near_origin: bool = True
    # ... unless it is a simplification or rewrite whose prompt explains its origin's answer
    # better by more than ``repair_gain`` (where the candidates table has it)
    repair: bool = True
    repair_gain: float = DEFAULT_REPAIR_GAIN
    # a candidate's IFD must be below this (None: no ceiling beyond the quality threshold)
    max_ifd: float | None = DEFAULT_MAX_IFD
    # a simplification or rewrite's prompt may read at most this much worse than its origin's
    # (``prompt_fluency_gain`` >= -max_fluency_loss, where measured; None: no floor)
    max_fluency_loss: float | None = DEFAULT_MAX_FLUENCY_LOSS
    # "flag": a candidate must not be flagged (not hard, not low quality); "typical": it must
    # also be at least as good as the round's median sample on both (see ACCEPTANCE_BARS)
    bar: str = "flag"

    def __post_init__(self):
        if self.bar not in ACCEPTANCE_BARS:
            raise ValueError(f"acceptance bar must be one of {', '.join(ACCEPTANCE_BARS)}, got {self.bar!r}")

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_RULES = GateRules()


@dataclass(frozen=True, kw_only=True)
class RoundThresholds(GateRules):
    """The thresholds the round's signals used (read back from the signal tables), with the
    rules they are applied under."""

    hard_before: float  # hard: loss_before > hard_before AND loss_after > hard_after
    hard_after: float
    quality: float  # low quality: quality_value < quality
    typical_loss_after: float = float("nan")  # the round's median loss after training
    typical_quality: float = float("nan")  # the round's median quality value


# ----------------------------------------------------------------------------------------------
# the gate


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _is_hard(loss_before, loss_after, th: RoundThresholds) -> bool:
    """Unknown losses count as hard: a candidate we could not score is not accepted."""
    if not (_finite(loss_before) and _finite(loss_after)):
        return True
    return loss_before > th.hard_before and loss_after > th.hard_after


def _is_low(q, th: RoundThresholds) -> bool:
    return not _finite(q) or (math.isfinite(th.quality) and q < th.quality)


def _is_repair(row: dict, th: RoundThresholds) -> bool:
    """A simplification or rewrite whose prompt explains its origin's answer better by more than
    the margin and reads at least as fluently. Null gains (an extension, no origin text, a
    stored table from before the columns): not measured, not a repair."""
    fix, fluent = row.get("repair_gain"), row.get("prompt_fluency_gain")
    return (
        th.repair
        and row["operation"] != EXTENDED
        and _finite(fix)
        and fix > th.repair_gain
        and _finite(fluent)
        and fluent >= 0
    )


def _quality_reason(row: dict, th: RoundThresholds) -> str | None:
    q = row.get("quality_value")
    if row["operation"] == REWRITTEN:
        q0 = row.get("quality_value_original")
        if _is_low(q, th):
            return "still low quality"
        if _finite(q0) and not q > q0:
            return "not better than the original"
        return None
    return "low quality" if _is_low(q, th) else None


def _ifd_reason(row: dict, th: RoundThresholds) -> str | None:
    ifd = row.get("ifd")
    if th.max_ifd is not None and _finite(ifd) and ifd >= th.max_ifd:
        return "prompt does not explain the answer"
    return None


def _typical_quality_reason(row: dict, th: RoundThresholds) -> str | None:
    q = row.get("quality_value")
    if th.bar == "typical" and math.isfinite(th.typical_quality) and not (_finite(q) and q >= th.typical_quality):
        return "below the round's typical quality"
    return None


def base_reasons(row: dict, th: RoundThresholds, quality_known: bool = True) -> list[str]:
    """The rules a candidate breaks by its base-model readings alone: the IFD ceiling, and, when
    ``quality_known`` (the round's quality value is minus the IFD), the quality rules. Each is a
    rejection whatever the later readings say (no waiver applies to them), so the gate's cascade
    (``gate.gate_round``) reads no further a candidate that breaks one."""
    rules = (_quality_reason, _ifd_reason, _typical_quality_reason) if quality_known else (_ifd_reason,)
    return [r for r in (rule(row, th) for rule in rules) if r]


def candidate_reasons(
    row: dict, th: RoundThresholds, heldout_grams: set, ngram: int, control_tokens: Sequence[str] = ()
) -> list[str]:
    """Every rule one candidate breaks, in a fixed order (empty: it passes). A candidate that
    fails a text rule and was not re-scored (``gate.gate_round`` skips the forward passes for
    those) is rejected for its text reasons alone; one the cascade settled by its base-model
    readings (``gate_stage == "base"``) for those readings' reasons alone."""
    if row.get("status") != "ok":
        return [f"generation: {row.get('failure_reason') or 'failed'}"]
    reasons = text_reasons(row, heldout_grams, ngram, control_tokens)
    if reasons and row.get("loss_before") is None and row.get("loss_after") is None:
        return reasons
    if row.get("gate_stage") == "base":
        return reasons + base_reasons(row, th, quality_known=_finite(row.get("quality_value")))
    if th.near_origin:
        c0, nb = row.get("cosine_original"), row.get("neighbor_similarity_original")
        if _finite(c0) and _finite(nb) and c0 < nb and not _is_repair(row, th):
            reasons.append("far from its origin")
    op = row["operation"]
    if _is_hard(row.get("loss_before"), row.get("loss_after"), th):
        reasons.append("still hard")
    reasons += [r for r in (_quality_reason(row, th), _ifd_reason(row, th)) if r]
    fluent = row.get("prompt_fluency_gain")
    if th.max_fluency_loss is not None and op != EXTENDED and _finite(fluent) and fluent < -th.max_fluency_loss:
        reasons.append("prompt reads worse than its origin's")
    if th.bar == "typical":
        la = row.get("loss_after")
        if math.isfinite(th.typical_loss_after) and not (_finite(la) and la <= th.typical_loss_after):
            reasons.append("harder than the round's typical sample")
    if typical := _typical_quality_reason(row, th):
        reasons.append(typical)
    if op == EXTENDED:
        c = row.get("max_cosine")
        # a null ``max_cosine_same_task``: none of the candidate's nearest samples is the same
        # task; a stored table from before it has only the cosine, read the way it was then
        if th.duplicate_same_task and "max_cosine_same_task" in row:
            dup, cut = row["max_cosine_same_task"], th.same_task_cosine
        else:
            dup, cut = c, th.duplicate_cosine
        if not _finite(c):
            reasons.append("no embedding")
        elif _finite(dup) and dup >= cut:
            reasons.append("near-duplicate of a round sample")
        # null: not measured (no origin text, a stored table from before the column)
        gain = row.get("new_task_gain")
        if th.new_task and _finite(gain) and not gain > th.new_task_gain:
            reasons.append("its origin's task again")
    elif op not in (SIMPLIFIED, REWRITTEN):
        raise ValueError(f"unknown operation {op!r}")
    return reasons


def verify_candidates(
    candidates: pl.DataFrame,
    th: RoundThresholds,
    *,
    heldout_grams: set | None = None,
    ngram: int = DEFAULT_NGRAM,
    control_tokens: Sequence[str] = (),
) -> pl.DataFrame:
    """Adds ``passed`` and ``reasons`` ("; "-joined, null when passed) to every candidate row.

    Expects the candidate columns of ``operations.run_operations`` (``origin_id``,
    ``operation``, ``candidate``, ``status``, ``instruction_after``, ``output_after``,
    ``truncated``) and the re-scored signals (``loss_before``, ``loss_after``,
    ``quality_value``, ``quality_value_original``, ``max_cosine`` and ``max_cosine_same_task``
    (when present); ``cosine_original`` and
    ``neighbor_similarity_original`` for ``near_origin``, which is skipped where they are
    missing; ``new_task_gain``, ``repair_gain``, ``prompt_fluency_gain`` and ``ifd``, whose rules
    are skipped where null)."""
    grams = heldout_grams or set()
    reasons = [candidate_reasons(r, th, grams, ngram, control_tokens) for r in candidates.iter_rows(named=True)]
    return candidates.with_columns(
        pl.Series("passed", [not r for r in reasons], dtype=pl.Boolean),
        pl.Series("reasons", ["; ".join(r) if r else None for r in reasons], dtype=pl.String),
    )


def choose_candidates(verified: pl.DataFrame) -> pl.DataFrame:
    """One row per (origin_id, operation): the accepted candidate (``status = "ok"``), or the
    best rejected one (``status = "rejected"``, ``failure_reason = "verification: <first
    reason>"``) or a failed one (``status = "failed"``) when no candidate was generated.

    Best = passed first, then highest quality value, then lowest loss after training, then the
    lowest candidate index (deterministic)."""
    if verified.height == 0:
        return verified.with_columns(
            pl.lit(0, dtype=pl.Int64).alias("n_candidates"), pl.lit(0, dtype=pl.Int64).alias("n_passed")
        )
    ranked = verified.with_columns(
        pl.col("status").eq("ok").alias("_generated"),
        pl.col("quality_value").fill_nan(None).alias("_q"),
        pl.col("loss_after").fill_nan(None).alias("_la"),
    ).sort(
        ["origin_id", "operation", "passed", "_generated", "_q", "_la", "candidate"],
        descending=[False, False, True, True, True, False, False],
        nulls_last=True,
    )
    counts = verified.group_by(["origin_id", "operation"]).agg(
        pl.len().cast(pl.Int64).alias("n_candidates"), pl.col("passed").sum().cast(pl.Int64).alias("n_passed")
    )
    best = ranked.group_by(["origin_id", "operation"], maintain_order=True).first().drop(["_generated", "_q", "_la"])
    best = best.join(counts, on=["origin_id", "operation"], how="left")
    first_reason = pl.col("reasons").str.split("; ").list.first()
    return best.with_columns(
        pl.when(pl.col("passed"))
        .then(pl.lit("ok"))
        .when(pl.col("status") == "ok")
        .then(pl.lit("rejected"))
        .otherwise(pl.col("status"))
        .alias("status"),
        pl.when(pl.col("passed"))
        .then(pl.lit(None, dtype=pl.String))
        .when(pl.col("status") == "ok")
        .then(pl.lit("verification: ") + first_reason)
        .otherwise(pl.col("failure_reason"))
        .alias("failure_reason"),
    ).sort(["operation", "origin_id"])
