"""Asset checks emitted by the assets themselves, so each runs for the round partition at hand
(standalone @asset_check is per asset, not per partition) and shows in the UI beside the asset."""

import polars as pl
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from middo_pipeline.core.schema import schema_problems

SCHEMA = "schema_and_provenance"
FLAG_BAND = "flagged_fraction_in_band"
# a threshold that flags nothing, or more than this, is suspicious (wrong m, broken signal)
MAX_SANE_FRACTION = 0.5


def schema_spec(asset: str) -> AssetCheckSpec:
    return AssetCheckSpec(
        SCHEMA,
        asset=asset,
        description="Columns and types, no blank prompt or response, unique sample_id, provenance complete",
    )


def schema_check(df: pl.DataFrame, asset: str) -> AssetCheckResult:
    problems = schema_problems(df)
    return AssetCheckResult(
        check_name=SCHEMA,
        asset_key=asset,
        passed=not problems,
        metadata={"problems": MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none"), "rows": df.height},
    )


def band_spec(asset: str) -> AssetCheckSpec:
    return AssetCheckSpec(
        FLAG_BAND,
        asset=asset,
        description=f"Warns when the threshold flags nothing or more than {MAX_SANE_FRACTION:.0%} of the samples",
    )


def band_check(flagged: int, total: int, asset: str) -> AssetCheckResult:
    fraction = flagged / total if total else 0.0
    ok = 0 < flagged and fraction <= MAX_SANE_FRACTION
    return AssetCheckResult(
        check_name=FLAG_BAND,
        asset_key=asset,
        passed=ok,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "flagged": flagged,
            "fraction": fraction,
            "note": "flags nothing" if flagged == 0 else ("flags too many" if not ok else "ok"),
        },
    )
