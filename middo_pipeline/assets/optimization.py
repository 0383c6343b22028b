"""Steps 3 and 4 of the loop: the optimizer LLM rewrites flagged samples; the merge builds D_{r+1}."""


from typing import Literal

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetOut,
    Config,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)
from pydantic import Field

from middo_pipeline.assets._checks import schema_check, schema_spec
from middo_pipeline.assets._meta import json_md, preview_md
from middo_pipeline.core.merge import SizePolicy, check_conservation, merge_round
from middo_pipeline.core.optimizer.operations import plan_operations, run_operations
from middo_pipeline.core.optimizer.prompts import PromptConfig, PromptStyle
from middo_pipeline.core.progress import ProgressLogger
from middo_pipeline.core.schema import fingerprint
from middo_pipeline.resources import OptimizerResource, StorageResource
from middo_pipeline.rounds import round_number, rounds_partitions


class RefineConfig(Config):
    simplify: bool = Field(default=True, description="Simplify hard samples (complexity signal)")
    extend: bool = Field(default=True, description="Extend sparse samples (diversity signal)")
    rewrite: bool = Field(default=True, description="Rewrite low-quality samples (quality signal)")
    prompt_style: Literal["auto", PromptStyle] = Field(default="auto", description="direct (small models) | stepwise (strong models) | auto: direct for the local backend, stepwise for openai")
    max_prompt_tokens: int | None = Field(default=None, description="Max new tokens for a new prompt (default 160 direct, 768 stepwise)")
    max_response_tokens: int = Field(default=192, description="Max new tokens for a new response")
    temperature: float = Field(default=0.0)
    seed: int = Field(default=0)


@asset(
    partitions_def=rounds_partitions,
    group_name="optimize",
    kinds={"polars"},
    description=(
        "One row per attempted operation: hard → simplified, low quality → rewritten, sparse → extended (with its "
        "neighbours as hints). Prompt and response before and after, status and failure reason. Every LLM call is cached."
    ),
)
def refined_samples(
    context: AssetExecutionContext,
    config: RefineConfig,
    optimizer: OptimizerResource,
    storage: StorageResource,
    round_dataset: pl.DataFrame,
    loss_signals: pl.DataFrame,
    embedding_signals: pl.DataFrame,
    quality_signals: pl.DataFrame,
) -> pl.DataFrame:
    r = round_number(context.partition_key)

    def flagged(df: pl.DataFrame, column: str, enabled: bool) -> list[str]:
        return df.filter(pl.col(column))["sample_id"].to_list() if enabled else []

    hard = flagged(loss_signals, "is_hard", config.simplify)
    low = flagged(quality_signals, "is_low_quality", config.rewrite)
    sparse = flagged(embedding_signals, "is_sparse", config.extend)
    neighbors = dict(zip(embedding_signals["sample_id"].to_list(), embedding_signals["neighbor_ids"].to_list()))
    plan = plan_operations(round_dataset, hard, low, sparse, neighbors)
    context.log.info(f"{plan.height} operations planned: hard={len(hard)} low_quality={len(low)} sparse={len(sparse)}")

    backend = optimizer.make_backend(storage.get())
    style = optimizer.default_style() if config.prompt_style == "auto" else config.prompt_style
    max_prompt = config.max_prompt_tokens or (160 if style == "direct" else 768)
    prompt_cfg = PromptConfig(style=style, max_prompt_tokens=max_prompt, max_response_tokens=config.max_response_tokens,
                              temperature=config.temperature, seed=config.seed)
    refined = run_operations(round_dataset, plan, neighbors, backend, prompt_cfg, round_number=r,
                             progress=ProgressLogger(context.log.info, "optimizer calls", unit="calls"))
    ok = refined.filter(pl.col("status") == "ok")
    failed = refined.filter(pl.col("status") != "ok")
    stats = backend.stats()
    context.add_output_metadata(
        {
            "attempted": refined.height,
            "succeeded": ok.height,
            "failed": failed.height,
            "by_operation": json_md(dict(refined.group_by("operation").len().sort("operation").iter_rows())),
            "failures_by_reason": json_md(dict(failed.group_by("failure_reason").len().sort("failure_reason").iter_rows())),
            "cache": json_md(stats),
            "prompt_style": prompt_cfg.style,
            "optimizer": f"{optimizer.backend}:{optimizer.model}",
            "before_after": preview_md(ok, ["operation", "instruction_before", "instruction_after", "output_after"], n=10),
            "failed_examples": preview_md(failed, ["operation", "origin_id", "failure_reason", "instruction_before"], n=10),
        }
    )
    return refined


class MergeConfig(Config):
    size_policy: SizePolicy = Field(default="keep", description="keep: grow at most max_growth (sparsest extensions first); grow: no cap (the reference)")
    max_growth: float = Field(default=0.15, description="With size_policy=keep: the largest allowed growth, as a fraction")


@multi_asset(
    partitions_def=rounds_partitions,
    group_name="optimize",
    outs={
        "optimized_dataset": AssetOut(
            kinds={"polars"},
            description="D_{r+1} = (D_r − hard − low quality) + simplified + rewritten + extended, with stable ids and provenance (round, origin_id, operation). Next round's input.",
        ),
        "sample_accounting": AssetOut(
            kinds={"polars"},
            description="What happened to every sample of the round's input: kept, replaced (with its replacement), extended beside, or kept after a failed rewrite.",
        ),
    },
    check_specs=[
        schema_spec("optimized_dataset"),
        AssetCheckSpec("conservation", asset="optimized_dataset",
                       description="Every sample of the round's input is kept, replaced (linked), or extended beside: none disappears"),
        AssetCheckSpec("size_policy", asset="optimized_dataset", description="Growth stays within the configured bound"),
    ],
)
def optimized_dataset(
    context: AssetExecutionContext,
    config: MergeConfig,
    storage: StorageResource,
    round_dataset: pl.DataFrame,
    refined_samples: pl.DataFrame,
    embedding_signals: pl.DataFrame,
):
    r = round_number(context.partition_key)
    sparse_order = embedding_signals.filter(pl.col("is_sparse")).sort("knn_mean_similarity")["sample_id"].to_list()
    result = merge_round(round_dataset, refined_samples, round_number=r, size_policy=config.size_policy,
                         max_growth=config.max_growth, sparse_order=sparse_order)
    problems = check_conservation(round_dataset, result.dataset, result.accounting)
    conservation = AssetCheckResult(
        check_name="conservation", asset_key="optimized_dataset", passed=not problems,
        metadata={"problems": MetadataValue.md("\n".join(f"- {p}" for p in problems[:50]) or "none"),
                  "input_samples": round_dataset.height},
    )
    if problems:  # never write a dataset that lost samples
        raise RuntimeError(f"{context.partition_key}: merge lost track of samples: {'; '.join(problems[:5])}")
    ds = result.dataset
    growth = ds.height / max(round_dataset.height, 1) - 1.0
    # the rows the merge removed as exact duplicates, with the row each repeats: kept as data
    store = storage.get()
    dup_path = store.write_table(result.duplicates,
                                 store.artifact_dir("optimized_dataset", context.partition_key) / "duplicates.parquet")
    changed = refined_samples.filter(pl.col("status") == "ok")
    yield Output(
        ds,
        output_name="optimized_dataset",
        metadata={
            "rows_before": round_dataset.height,
            "rows_after": ds.height,
            "growth": round(growth, 4),
            "size_policy": config.size_policy,
            "counts": json_md(result.counts),
            "duplicates_removed": result.duplicates.height,
            "duplicates": MetadataValue.path(str(dup_path)),
            "rows_by_operation": json_md(dict(ds.group_by("operation").len().sort("operation").iter_rows())),
            "fingerprint": fingerprint(ds),
            "before_after": preview_md(changed, ["operation", "instruction_before", "instruction_after", "output_after"], n=10),
        },
    )
    yield schema_check(ds, "optimized_dataset")
    yield conservation
    yield AssetCheckResult(
        check_name="size_policy", asset_key="optimized_dataset",
        passed=config.size_policy == "grow" or growth <= config.max_growth + 1e-9,
        metadata={"growth": growth, "size_policy": config.size_policy, "max_growth": config.max_growth},
    )
    yield Output(
        result.accounting,
        output_name="sample_accounting",
        metadata={"samples": result.accounting.height,
                  "by_fate": json_md(dict(result.accounting.group_by("fate").len().sort("fate").iter_rows()))},
    )
