"""One call for the whole verification gate of a round: read the round's thresholds and
quality scale from its signal tables, re-score the candidates with the round's models
(``rescore``) and apply the rules (``verify``).

The ``refined_samples`` asset and the downstream benchmark (which re-gates a finished round's
stored candidates with this version's rules) both go through ``gate_round``, so what the
benchmark measures is what the pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import polars as pl

from middo_pipeline.core import diversity
from middo_pipeline.core.forward import EmbeddingSpec
from middo_pipeline.core.rescore import RescoreSettings, rescore_candidates
from middo_pipeline.core.schema import prompt_text
from middo_pipeline.core.text_rules import DEFAULT_NGRAM, text_reasons
from middo_pipeline.core.verify import (
    DEFAULT_RULES,
    GateRules,
    QualityScale,
    RoundThresholds,
    base_reasons,
    verify_candidates,
)

__all__ = ["round_thresholds", "quality_scale", "gate_round", "stage_counts"]


def round_thresholds(
    loss_signals: pl.DataFrame, quality_signals: pl.DataFrame, rules: GateRules = DEFAULT_RULES
) -> RoundThresholds:
    """The thresholds the round's signals stored with their tables, under ``rules``; for the
    ``typical`` bar also the round's median loss after training and median quality value (of
    the round's samples, never of the candidates)."""

    def one(df: pl.DataFrame, col: str) -> float:
        if col not in df.columns or df.height == 0:
            raise ValueError(f"{col} is missing from the round's signals: re-materialize them with this version")
        v = df[col][0]
        return float("nan") if v is None else float(v)

    return RoundThresholds(
        **rules.as_dict(),
        hard_before=one(loss_signals, "threshold_loss_before"),
        hard_after=one(loss_signals, "threshold_loss_after"),
        quality=one(quality_signals, "quality_threshold"),
        typical_loss_after=_median(loss_signals, "loss_after"),
        typical_quality=_median(quality_signals, "quality_value"),
    )


def _median(df: pl.DataFrame, col: str) -> float:
    if col not in df.columns:
        return float("nan")
    x = df[col].cast(pl.Float64).fill_nan(None).drop_nulls()
    return float(x.median()) if x.len() else float("nan")


def quality_scale(quality_signals: pl.DataFrame) -> QualityScale:
    """The round's quality scale, as stored in its quality table."""
    row = quality_signals.row(0, named=True)
    return QualityScale(
        row["quality_mode"],
        *(
            float(row[k]) if row[k] is not None else float("nan")
            for k in ("judge_mean", "judge_std", "ifd_mean", "ifd_std")
        ),
    )


def originals(loss_signals: pl.DataFrame, quality_signals: pl.DataFrame, embedding_signals: pl.DataFrame):
    """Per origin sample: its quality value, losses and neighbourhood similarity (the
    candidates are compared with them)."""
    return (
        quality_signals.select(
            pl.col("sample_id").alias("origin_id"), pl.col("quality_value").alias("quality_value_original")
        )
        .join(
            loss_signals.select(
                pl.col("sample_id").alias("origin_id"),
                pl.col("loss_before").cast(pl.Float64).alias("loss_before_original"),
                pl.col("loss_after").cast(pl.Float64).alias("loss_after_original"),
            ),
            on="origin_id",
            how="left",
        )
        .join(
            embedding_signals.select(
                pl.col("sample_id").alias("origin_id"),
                pl.col("knn_mean_similarity").cast(pl.Float64).alias("neighbor_similarity_original"),
            ),
            on="origin_id",
            how="left",
        )
    )


def _round_texts(model_readouts: pl.DataFrame, round_dataset: pl.DataFrame) -> list[tuple[str, str]]:
    """(prompt, response) of every round sample, in the order of its embeddings."""
    texts = {
        sid: (prompt_text(i, x), o or "")
        for sid, i, x, o in round_dataset.select("sample_id", "instruction", "input", "output").iter_rows()
    }
    ids = model_readouts["sample_id"].to_list()
    missing = [sid for sid in ids if sid not in texts]
    if missing:
        raise ValueError(f"{len(missing)} samples of the round's readouts are not in its dataset (e.g. {missing[0]!r})")
    return [texts[sid] for sid in ids]


def gate_round(
    candidates: pl.DataFrame,
    *,
    model_readouts: pl.DataFrame,
    loss_signals: pl.DataFrame,
    quality_signals: pl.DataFrame,
    embedding_signals: pl.DataFrame,
    base,
    checkpoint,
    judge_model=None,
    rules: GateRules = DEFAULT_RULES,
    round_dataset: pl.DataFrame | None = None,
    heldout_grams: set | None = None,
    ngram: int = DEFAULT_NGRAM,
    control_tokens: Sequence[str] = (),
    cascade: bool = True,
    log: Callable[[str], None] | None = None,
    progress=None,
) -> tuple[pl.DataFrame, RoundThresholds]:
    """Every candidate re-scored and verified (``passed``, ``reasons``), and the thresholds
    used. ``base`` / ``checkpoint`` / ``judge_model``: as in ``rescore_candidates``; ``rules``:
    the gate's rule settings (``verify.GateRules``: the acceptance bar, which rules apply and
    their margins; see ``verify``'s module docstring). ``round_dataset`` (the round's samples:
    ``sample_id``, ``instruction``, ``input``, ``output``) lets the near-duplicate rule read
    which near samples are the same task (without it, or with ``duplicate_same_task`` off, the
    cosine alone decides: any sample at ``duplicate_cosine`` or more). The cross-prompt passes
    run only for the rules that read them (``new_task``; ``repair`` with ``near_origin``, or
    ``max_fluency_loss``).
    ``cascade``: a candidate whose base-model readings already reject it (``verify.base_reasons``:
    the IFD ceiling, and the quality rules when the round's quality reads IFD alone) gets no
    further pass — no cross-prompt passes, no checkpoint pass, no judgement — and its reasons
    are those readings' alone; the verdicts are the same as without it. Off (the benchmarks,
    which re-judge the scored candidates under other rules): every candidate is read in full."""
    same = rules.duplicate_same_task and round_dataset is not None
    th = round_thresholds(loss_signals, quality_signals, replace(rules, duplicate_same_task=same))
    scale = quality_scale(quality_signals)
    readout = model_readouts.row(0, named=True)
    spec = EmbeddingSpec(pooling=readout["embedding_pooling"], layer=readout["embedding_layer"])
    round_emb = np.asarray(model_readouts["embedding"].to_list(), dtype=np.float32)
    comps = diversity.TopComponents(int(embedding_signals["top_components"][0])).fit(round_emb)
    # a candidate its text already rejects (cut at the limit, control tokens, held-out overlap,
    # talks about the task) costs no forward pass: only the others are re-scored
    grams = heldout_grams or set()
    text_ok = [
        r.get("status") == "ok" and not text_reasons(r, grams, ngram, control_tokens)
        for r in candidates.iter_rows(named=True)
    ]
    # each candidate beside its origin's signals (the rewrite rule compares the two)
    indexed = (
        candidates.with_row_index("_gate_row")
        .join(originals(loss_signals, quality_signals, embedding_signals), on="origin_id", how="left")
        .sort("_gate_row")
    )
    to_score = indexed.filter(pl.Series(text_ok, dtype=pl.Boolean))
    scored = rescore_candidates(
        to_score,
        base=base,
        checkpoint=checkpoint,
        judge_model=judge_model,
        scale=scale,
        round_embeddings=comps.transform(round_emb),
        round_ids=model_readouts["sample_id"].to_list(),
        round_texts=_round_texts(model_readouts, round_dataset) if same else None,
        new_task=rules.new_task,
        repair=(rules.repair and rules.near_origin) or rules.max_fluency_loss is not None,
        components=comps,
        settings=RescoreSettings(embedding=spec),
        early_reject=(lambda row: bool(base_reasons(row, th, scale.mode == "ifd"))) if cascade else None,
        log=log,
        progress=progress,
    )
    rest = indexed.filter(~pl.Series(text_ok, dtype=pl.Boolean))
    rest = rest.with_columns(
        pl.when(pl.col("status") == "ok").then(pl.lit("text")).otherwise(None).cast(pl.String).alias("gate_stage")
    )
    scored = pl.concat([scored, rest], how="diagonal_relaxed").sort("_gate_row").drop("_gate_row")
    verified = verify_candidates(scored, th, heldout_grams=grams, ngram=ngram, control_tokens=control_tokens)
    return verified, th


GATE_STAGES = ("text", "base", "full")


def stage_counts(verified: pl.DataFrame) -> dict[str, int]:
    """How many candidates ``gate_round`` settled at each stage (``gate_stage``: ``text``, its
    text rules; ``base``, its base-model readings; ``full``, read in full), in that order; empty
    for a table without the column (the gate off, or stored before it)."""
    if "gate_stage" not in verified.columns:
        return {}
    counts = dict(verified["gate_stage"].drop_nulls().value_counts().iter_rows())
    return {k: int(counts[k]) for k in GATE_STAGES if k in counts}
