"""Step 4 of the loop: the merge builds D_{r+1} from the round's input and its accepted refinements,
or hands on the previous round's data when the round is rolled back."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetOut,
    Config,
    MetadataValue,
    Output,
    multi_asset,
)
from pydantic import Field

from middo_pipeline.assets._checks import schema_check, schema_spec
from middo_pipeline.assets._meta import json_md, preview_md, tidy
from middo_pipeline.assets._rollback import round_verdict
from middo_pipeline.core.merge import (
    DEFAULT_MAX_GROWTH,
    DEFAULT_SIZE_POLICY,
    DEFAULT_UNREPAIRED,
    UNREPAIRED_TABLE,
    MergeResult,
    SizePolicy,
    Unrepaired,
    check_conservation,
    merge_round,
    unrepaired_ids,
)
from middo_pipeline.core.rollback import RollbackVerdict, rollback_round
from middo_pipeline.core.schema import fingerprint
from middo_pipeline.resources import EvaluationResource, StorageResource
from middo_pipeline.rounds import (
    latest_materialization,
    previous_round,
    previous_table,
    round_number,
    rounds_partitions,
)


class MergeConfig(Config):
    size_policy: SizePolicy = Field(
        default=DEFAULT_SIZE_POLICY,
        description="keep: grow at most max_growth (sparsest extensions first); grow: no cap (the reference)",
    )
    max_growth: float = Field(
        default=DEFAULT_MAX_GROWTH, description="With size_policy=keep: the largest allowed growth, as a fraction"
    )
    unrepaired: Unrepaired = Field(
        default=DEFAULT_UNREPAIRED,
        description="A sample whose fixes the gate all refused: keep it, or quarantine it (out of the next "
        "round's data, kept in the unrepaired_samples table; middo export --quarantined)",
    )


@multi_asset(
    partitions_def=rounds_partitions,
    group_name="optimize",
    # the round's evaluation decides whether its input is rolled back (read from storage: a round
    # run without it is merged as usual)
    deps=["round_evaluation"],
    outs={
        "optimized_dataset": AssetOut(
            kinds={"polars"},
            description="D_{r+1} = (D_r − hard − low quality) + simplified + rewritten + extended, with stable ids and provenance (round, origin_id, operation). Next round's input. When D_r trained a significantly worse model than D_{r-1} (round_evaluation), D_{r+1} is D_{r-1} again: the previous round's refinements are withdrawn (on_regression: rollback, the default).",
        ),
        "sample_accounting": AssetOut(
            kinds={"polars"},
            description="What happened to every sample of the round's input: kept, replaced (with its replacement), extended beside, kept after a failed rewrite, or withdrawn by a rollback (with the original restored).",
        ),
    },
    check_specs=[
        schema_spec("optimized_dataset"),
        AssetCheckSpec(
            "conservation",
            asset="optimized_dataset",
            description="Every sample of the round's input is kept, replaced (linked), or extended beside: none disappears",
        ),
        AssetCheckSpec(
            "size_policy", asset="optimized_dataset", description="Growth stays within the configured bound"
        ),
    ],
)
def optimized_dataset(
    context: AssetExecutionContext,
    config: MergeConfig,
    storage: StorageResource,
    evaluation: EvaluationResource,
    round_dataset: pl.DataFrame,
    refined_samples: pl.DataFrame,
    embedding_signals: pl.DataFrame,
):
    key = context.partition_key
    store = storage.get()
    verdict = round_verdict(store, key, round_dataset, evaluation)
    decision = verdict.reason + _skipped_note(context, verdict, refined_samples)
    if verdict.rollback:
        prev_path = previous_table(store, "round_dataset", key)
        if not prev_path.exists():
            raise FileNotFoundError(
                f"{key}: {decision}; rolling back needs {previous_round(key)}'s round_dataset at {prev_path}, which "
                f"is missing. Materialize round_dataset for {previous_round(key)} again, or set on_regression: keep "
                "for this run."
            )
        context.log.warning(f"{key}: {decision}")
        result = rollback_round(
            round_dataset, pl.read_parquet(prev_path), round_number=round_number(key), reason=decision
        )
    else:
        sparse_order = embedding_signals.filter(pl.col("is_sparse")).sort("knn_mean_similarity")["sample_id"].to_list()
        result = merge_round(
            round_dataset,
            refined_samples,
            round_number=round_number(key),
            size_policy=config.size_policy,
            max_growth=config.max_growth,
            sparse_order=sparse_order,
            quarantine=unrepaired_ids(refined_samples) if config.unrepaired == "quarantine" else (),
        )
    problems = check_conservation(round_dataset, result.dataset, result.accounting)
    if problems:  # never write a dataset that lost samples
        raise RuntimeError(f"{key}: merge lost track of samples: {'; '.join(problems[:5])}")
    ds = result.dataset
    growth = ds.height / max(round_dataset.height, 1) - 1.0
    # the rows the merge removed as exact duplicates, with the row each repeats: kept as data
    dup_path = store.write_table(result.duplicates, store.artifact_dir("optimized_dataset", key) / "duplicates.parquet")
    # the samples taken out as unrepaired: a table of their own, exportable (middo export --quarantined)
    store.write_table(result.quarantined, store.table_path(UNREPAIRED_TABLE, key))
    metadata = _dataset_metadata(
        config, evaluation, verdict, decision, result, round_dataset, refined_samples, dup_path
    )
    yield Output(ds, output_name="optimized_dataset", metadata=metadata)
    yield schema_check(ds, "optimized_dataset")
    yield AssetCheckResult(
        check_name="conservation",
        asset_key="optimized_dataset",
        passed=True,
        metadata={"problems": MetadataValue.md("none"), "input_samples": round_dataset.height},
    )
    yield AssetCheckResult(
        check_name="size_policy",
        asset_key="optimized_dataset",
        passed=config.size_policy == "grow" or growth <= config.max_growth + 1e-9,
        metadata={"growth": growth, "size_policy": config.size_policy, "max_growth": config.max_growth},
    )
    yield Output(
        result.accounting,
        output_name="sample_accounting",
        metadata={
            "samples": result.accounting.height,
            "by_fate": json_md(dict(result.accounting.group_by("fate").len().sort("fate").iter_rows())),
        },
    )


def _skipped_note(context: AssetExecutionContext, verdict: RollbackVerdict, refined_samples: pl.DataFrame) -> str:
    """When this merge does not roll back but refined_samples, materialized in a run that expected a
    rollback, generated nothing: what the decision must add."""
    if verdict.rollback or refined_samples.height:
        return ""
    rec = latest_materialization(context.instance, "refined_samples", context.partition_key)
    md = rec.asset_materialization.metadata if rec and rec.asset_materialization else {}
    if not (md.get("skipped_for_rollback") and md["skipped_for_rollback"].value):
        return ""
    note = (
        f"; refined_samples generated none of its {md['skipped_for_rollback'].value} planned refinements, as "
        "its run expected a rollback: materialize refined_samples in the same run as this setting to merge them"
    )
    context.log.warning(f"{context.partition_key}: {verdict.reason}{note}")
    return note


def _dataset_metadata(
    config: MergeConfig,
    evaluation: EvaluationResource,
    verdict: RollbackVerdict,
    decision: str,
    result: MergeResult,
    round_dataset: pl.DataFrame,
    refined_samples: pl.DataFrame,
    duplicates_path,
) -> dict:
    """optimized_dataset's metadata: the verdict, sizes, counts and a before/after preview."""
    ds = result.dataset
    changed = refined_samples.filter(pl.col("status") == "ok")
    if verdict.rollback:
        withdrawn = round_dataset.filter(pl.col("operation").is_in(list(result.counts["withdrawn_by_operation"])))
        shown = {
            "withdrawn": result.counts["withdrawn"],
            "withdrawn_by_operation": json_md(result.counts["withdrawn_by_operation"]),
            "restored": result.counts["restored"],
            "refinements_not_merged": changed.height,
            "before_after": preview_md(withdrawn, ["operation", "origin_id", "instruction", "output"], n=10),
        }
    else:
        columns = ["operation", "instruction_before", "instruction_after", "output_after"]
        shown = {"before_after": preview_md(changed, columns, n=10)}
    metadata = {
        "rolled_back": verdict.rollback,
        "regression_decision": decision,
        "on_regression": evaluation.on_regression,
        "rollback_noise_floor": json_md(verdict.noise_floor),
        "rows_before": round_dataset.height,
        "rows_after": ds.height,
        "growth": round(ds.height / max(round_dataset.height, 1) - 1.0, 4),
        "size_policy": config.size_policy,
        "unrepaired": config.unrepaired,
        "quarantined": result.quarantined.height,
        "counts": json_md(result.counts),
        "duplicates_removed": result.duplicates.height,
        "duplicates": MetadataValue.path(str(duplicates_path)),
        "rows_by_operation": json_md(dict(ds.group_by("operation").len().sort("operation").iter_rows())),
        "fingerprint": fingerprint(ds),
        **shown,
    }
    return tidy(
        metadata, first=("rolled_back", "rows_after", "rows_before", "growth", "rows_by_operation", "before_after")
    )
