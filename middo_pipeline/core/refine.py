"""Step 3 around the optimizer calls: which flagged samples to refine, with which prompt style and
acceptance bar, and how the chosen candidates add up. Plain Python; ``refined_samples`` calls it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from middo_pipeline.core.evaluation import load_eval_set
from middo_pipeline.core.optimizer.operations import plan_operations
from middo_pipeline.core.optimizer.prompts import PromptConfig
from middo_pipeline.core.optimizer.style import choose_style
from middo_pipeline.core.rollback import RollbackVerdict
from middo_pipeline.core.text_rules import ngram_set
from middo_pipeline.core.verify import RoundThresholds, choose_candidates, resolve_acceptance_bar

# new-prompt token limit when none is configured: a direct prompt is the prompt itself, a
# stepwise one carries its plan and review before the final prompt
MAX_PROMPT_TOKENS = {"direct": 160, "stepwise": 768}
# candidate c of round r samples with seed + ROUND_SEED_STRIDE * r + c (distinct seeds per round)
ROUND_SEED_STRIDE = 1000
# the chosen rows' status -> the outcome shown in the UI
OUTCOMES = (("ok", "accepted"), ("rejected", "rejected"), ("failed", "failed"))


@dataclass
class RefinementPlan:
    """The round's flagged samples and the operations planned for them (``plan_operations``)."""

    operations: pl.DataFrame
    neighbors: dict[str, list[str]]
    hard: list[str] = field(default_factory=list)
    low_quality: list[str] = field(default_factory=list)
    sparse: list[str] = field(default_factory=list)

    @property
    def hard_and_low_quality(self) -> int:
        """Samples flagged hard and low quality: rewritten, not simplified."""
        return len(set(self.hard) & set(self.low_quality))

    @property
    def sparse_not_extended(self) -> int:
        """Sparse samples that are also low quality: not extended."""
        return len(set(self.sparse) & set(self.low_quality))

    def summary(self) -> str:
        return (
            f"{self.operations.height} operations planned: hard={len(self.hard)} "
            f"low_quality={len(self.low_quality)} sparse={len(self.sparse)} (hard and low quality: "
            f"{self.hard_and_low_quality}, rewritten; sparse and low quality: {self.sparse_not_extended}, not extended)"
        )


def plan_refinements(
    round_dataset: pl.DataFrame,
    loss_signals: pl.DataFrame,
    quality_signals: pl.DataFrame,
    embedding_signals: pl.DataFrame,
    *,
    simplify: bool = True,
    rewrite: bool = True,
    extend: bool = True,
) -> RefinementPlan:
    """The operations for the samples the round's signals flagged (each kind switchable)."""

    def flagged(df: pl.DataFrame, column: str, enabled: bool) -> list[str]:
        return df.filter(pl.col(column))["sample_id"].to_list() if enabled else []

    hard = flagged(loss_signals, "is_hard", simplify)
    low = flagged(quality_signals, "is_low_quality", rewrite)
    sparse = flagged(embedding_signals, "is_sparse", extend)
    neighbors = dict(zip(embedding_signals["sample_id"].to_list(), embedding_signals["neighbor_ids"].to_list()))
    operations = plan_operations(round_dataset, hard, low, sparse, neighbors)
    return RefinementPlan(operations, neighbors, hard, low, sparse)


def withhold_for_rollback(plan: RefinementPlan, verdict: RollbackVerdict) -> int:
    """When the merge will roll the round back (``verdict.rollback``), its refinements would not be
    merged: the plan's operations are dropped and their number returned; else 0, the plan kept."""
    if not verdict.rollback:
        return 0
    n = plan.operations.height
    plan.operations = plan.operations.clear()
    return n


def max_prompt_tokens(style: str, configured: int | None = None) -> int:
    """The new-prompt token limit: ``configured``, else the style's default."""
    return configured or MAX_PROMPT_TOKENS[style]


def round_seed(seed: int, round_number: int) -> int:
    """The base seed of round ``round_number``'s candidates."""
    return seed + ROUND_SEED_STRIDE * round_number


def prompt_style(configured: str, backend, default: str, planned: bool) -> tuple[str, str]:
    """The prompt style and why: ``auto`` probes the optimizer (``choose_style``) when there is
    something to refine, else takes the backend's ``default``."""
    if configured != "auto":
        return configured, "configured"
    if planned:
        return choose_style(backend)
    return default, "nothing to refine"


def acceptance_bar(
    configured: str, configured_style: str, backend, style: str, style_reason: str, planned: bool
) -> tuple[str, str]:
    """The bar the gate applies, and why. ``auto`` asks what the optimizer can do, as
    ``prompt_style: auto`` does (reusing its answer when the style was chosen that way)."""
    if configured != "auto":
        return configured, "configured"
    if not planned:
        return resolve_acceptance_bar("auto", "direct"), "auto; nothing to verify"
    if configured_style != "auto":
        style, style_reason = choose_style(backend)
    strength = "a strong optimizer" if style == "stepwise" else "a small optimizer"
    return resolve_acceptance_bar("auto", style), f"auto: {strength} ({style_reason})"


def prompt_config(
    style: str,
    round_number: int,
    *,
    seed: int,
    temperature: float,
    max_response_tokens: int,
    max_prompt_tokens_configured: int | None = None,
) -> PromptConfig:
    """The optimizer prompts' settings for round ``round_number`` in ``style``."""
    return PromptConfig(
        style=style,
        max_prompt_tokens=max_prompt_tokens(style, max_prompt_tokens_configured),
        max_response_tokens=max_response_tokens,
        temperature=temperature,
        seed=round_seed(seed, round_number),
    )


def gate_and_choose(
    candidates: pl.DataFrame, k: int, gate: Callable[[], tuple[pl.DataFrame, RoundThresholds]]
) -> tuple[pl.DataFrame, pl.DataFrame, RoundThresholds | None]:
    """(verified candidates, one chosen row per operation, the gate's thresholds): ``gate()``
    verifies the candidates when there are any; with none, the empty tables with the gate's
    columns and no thresholds."""
    if candidates.height:
        verified, th = gate()
        return verified, choose_candidates(verified), th
    verified, chosen = first_candidates(candidates, k)
    return verified, chosen, None


def none_accepted(chosen: pl.DataFrame) -> str | None:
    """What to warn about when operations were attempted and not one was accepted, else None."""
    if not chosen.height or int((chosen["status"] == "ok").sum()):
        return None
    return (
        f"no refinement was accepted ({int((chosen['status'] == 'rejected').sum())} rejected, "
        f"{int((chosen['status'] == 'failed').sum())} failed): the round keeps its samples unchanged"
    )


def first_candidates(candidates: pl.DataFrame, k: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Without the gate: every candidate passes when it was generated, and each operation takes
    its first candidate unchecked (what the reference does). Returns (verified, chosen)."""
    verified = candidates.with_columns(
        pl.col("status").eq("ok").alias("passed"), pl.lit(None, dtype=pl.String).alias("reasons")
    )
    chosen = verified.filter(pl.col("candidate") == 0).with_columns(
        pl.lit(k, dtype=pl.Int64).alias("n_candidates"), pl.col("passed").cast(pl.Int64).alias("n_passed")
    )
    return verified, chosen


def rejections_by_reason(verified: pl.DataFrame) -> pl.DataFrame:
    """Rejected or failed candidates per (operation, first reason)."""
    return (
        verified.filter(~pl.col("passed"))
        .with_columns(
            pl.col("reasons").fill_null(pl.col("failure_reason")).str.split("; ").list.first().alias("reason")
        )
        .group_by("operation", "reason")
        .len()
        .sort("operation", "reason")
    )


def outcomes_by_operation(chosen: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Per operation, how many chosen rows were accepted, rejected and failed."""
    return {
        op: {name: int(((chosen["operation"] == op) & (chosen["status"] == code)).sum()) for code, name in OUTCOMES}
        for op in sorted(set(chosen["operation"].to_list()))
    }


def failure_counts(df: pl.DataFrame, sort_by_count: bool = False) -> dict[str, int]:
    """Rows whose status is not ``ok``, by ``failure_reason``."""
    if not df.height:
        return {}
    counts = df.filter(pl.col("status") != "ok").group_by("failure_reason").len()
    counts = counts.sort("len", descending=True) if sort_by_count else counts.sort("failure_reason")
    return dict(counts.iter_rows())


def heldout_grams(path: str | Path, n: int) -> set:
    """The ``n``-word runs of the held-out set, which no accepted candidate may share. A missing
    file is an error: the contamination check is never switched off silently."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"held-out file not found: {path}; the gate's contamination check reads it (set the held-out path "
            "to an existing JSONL file)"
        )
    df = load_eval_set(str(path))
    return ngram_set(df["instruction"].to_list() + df["input"].to_list() + df["output"].to_list(), n)
