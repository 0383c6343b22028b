"""Seed data in, and each round's input dataset."""

import hashlib
import os
from pathlib import Path

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
from middo_pipeline.assets._meta import json_md, length_stats, preview_md, tidy
from middo_pipeline.core.ingest import SeedFileError, read_seed
from middo_pipeline.core.schema import fingerprint, schema_problems
from middo_pipeline.core.storage import StorageError
from middo_pipeline.packaged import SEED, data_file
from middo_pipeline.preflight import PreflightError, resource_problems
from middo_pipeline.resources import ModelResource, OptimizerResource, StorageResource
from middo_pipeline.rounds import latest_materialization, previous_round, previous_table, rounds_partitions

DEFAULT_SEED = data_file(SEED)


def default_seed_path() -> str:
    return os.environ.get("MIDDO_SEED_PATH", str(DEFAULT_SEED))


class SeedConfig(Config):
    path: str = Field(
        default_factory=default_seed_path,
        description="Seed file: Alpaca JSON/JSONL, ShareGPT, messages JSONL or Parquet",
    )
    format: str | None = Field(
        default=None,
        description="Override format detection: alpaca_json | alpaca_jsonl | sharegpt | messages | parquet",
    )
    max_chars: int = Field(
        default=16000, description="Records longer than this (instruction+input+output) are quarantined"
    )


def file_sha256(path: str | Path) -> str:
    """The seed file's content hash: `middo loop --seed` compares it to tell a new seed from the same one."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _preflight(**resources) -> None:
    problems = resource_problems(**resources)
    if problems:
        raise PreflightError(problems)


@multi_asset(
    outs={
        "seed_dataset": AssetOut(
            description="The validated seed SFT data as the canonical sample table (round 0).",
            kinds={"polars"},
            group_name="ingestion",
        ),
        "seed_quarantine": AssetOut(
            description="Seed rows that could not be used, with file, line, field and reason.",
            kinds={"polars"},
            group_name="ingestion",
        ),
    },
    check_specs=[
        schema_spec("seed_dataset"),
        AssetCheckSpec(
            "every_row_accounted",
            asset="seed_dataset",
            description="Every record read is either in seed_dataset or in seed_quarantine",
        ),
    ],
)
def seed_dataset(context: AssetExecutionContext, config: SeedConfig):
    try:
        result = read_seed(config.path, format=config.format, max_chars=config.max_chars)
    except SeedFileError as exc:
        raise SeedFileError(f"seed file unusable: {exc}") from None
    samples, quarantine = result.samples, result.quarantine
    if samples.is_empty():
        raise SeedFileError(
            f"{config.path}: no usable rows ({quarantine.height} rejected); run `middo validate {config.path}`"
        )
    by_reason = result.rejected_by_reason()
    if quarantine.height:
        context.log.warning(f"{quarantine.height} of {result.total_records} seed rows quarantined: {by_reason}")
    yield Output(
        samples,
        output_name="seed_dataset",
        metadata=tidy(
            {
                "path": MetadataValue.path(str(Path(config.path).resolve())),
                "file_sha256": file_sha256(config.path),
                "format": result.format,
                "records_read": result.total_records,
                "rows": samples.height,
                "rejected": quarantine.height,
                "rejected_by_reason": json_md(by_reason),
                "truncated_conversations": int(getattr(result, "truncated_conversations", 0)),
                "fingerprint": fingerprint(samples),
                **length_stats(samples, "instruction"),
                **length_stats(samples, "output"),
                "preview": preview_md(samples, ["sample_id", "instruction", "input", "output"]),
            },
            first=("rows", "rejected", "rejected_by_reason"),
        ),
    )
    yield Output(
        quarantine,
        output_name="seed_quarantine",
        metadata={
            "rejected": quarantine.height,
            "rejected_by_reason": json_md(by_reason),
            "preview": preview_md(quarantine, ["location", "field", "reason", "raw"], n=20),
        },
    )
    yield schema_check(samples, "seed_dataset")
    yield AssetCheckResult(
        check_name="every_row_accounted",
        asset_key="seed_dataset",
        passed=result.total_records == samples.height + quarantine.height,
        metadata={"records_read": result.total_records, "rows": samples.height, "quarantined": quarantine.height},
    )


@asset(
    partitions_def=rounds_partitions,
    group_name="loop",
    kinds={"polars"},
    check_specs=[schema_spec("round_dataset")],
    description=(
        "The dataset a round trains on: round-1 is the seed; round r>1 is round r-1's optimized_dataset, "
        "loaded from storage (the loop cannot be a declared edge) with its provenance in the metadata."
    ),
)
def round_dataset(
    context: AssetExecutionContext,
    storage: StorageResource,
    model: ModelResource,
    optimizer: OptimizerResource,
    seed_dataset: pl.DataFrame,
):
    # the round's first step: a run launched from the UI or the schedule stops here, before training,
    # when a resource cannot work (the same check `middo loop` runs before anything)
    _preflight(model=model, optimizer=optimizer, storage=storage.get())
    prev = previous_round(context.partition_key)
    if prev is None:
        df = seed_dataset
        source = {"source": "seed_dataset", "source_partition": "-"}
        record = latest_materialization(context.instance, "seed_dataset")
    else:
        path = previous_table(storage.get(), "optimized_dataset", context.partition_key)
        record = latest_materialization(context.instance, "optimized_dataset", prev)
        if not path.exists():
            raise StorageError(
                f"{context.partition_key} starts from {prev}'s optimized_dataset, which is not materialized "
                f"(expected {path}). Run {prev} to the end first (`middo loop` or the round job for {prev})."
            )
        df = pl.read_parquet(path)
        source = {"source": "optimized_dataset", "source_partition": prev, "source_path": MetadataValue.path(str(path))}
    check = schema_check(df, "round_dataset")
    if not check.passed:
        raise ValueError(f"{context.partition_key}: input dataset is malformed: {'; '.join(schema_problems(df))}")
    ops = dict(df.group_by("operation").len().sort("operation").iter_rows())
    context.log.info(
        f"{context.partition_key}: {df.height} samples from {source['source']} {source['source_partition']}"
    )
    yield Output(
        df,
        metadata=tidy(
            {
                **source,
                "source_run_id": record.run_id if record else "unknown",
                "rows": df.height,
                "fingerprint": fingerprint(df),
                "rows_by_operation": json_md(ops),
                **length_stats(df, "output"),
                "preview": preview_md(df, ["sample_id", "operation", "origin_id", "instruction", "output"]),
            },
            first=("rows", "rows_by_operation"),
        ),
    )
    yield check
