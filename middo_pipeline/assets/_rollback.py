"""The round's rollback verdict, read the same way by refined_samples and optimized_dataset."""

from __future__ import annotations

import polars as pl

from middo_pipeline.core.rollback import RollbackVerdict, rollback_verdict
from middo_pipeline.resources import EvaluationResource
from middo_pipeline.rounds import previous_round, previous_table


def round_verdict(store, key: str, round_dataset: pl.DataFrame, evaluation: EvaluationResource) -> RollbackVerdict:
    """``core.rollback.rollback_verdict`` on the stored ``round_evaluation`` tables of round ``key``
    and the round before (a round run without its evaluation is merged as usual, and says so)."""
    prev = previous_round(key)
    this = store.table_path("round_evaluation", key)
    before = previous_table(store, "round_evaluation", key)
    return rollback_verdict(
        pl.read_parquet(this) if this.exists() else None,
        pl.read_parquet(before) if before is not None and before.exists() else None,
        round_dataset,
        key,
        prev,
        evaluation.rollback_policy(),
    )
