"""Assets called directly on tiny tables, as Dagster's example projects test them: a context from
``build_asset_context`` with the round as partition key, config and resources as arguments, the
upstream tables as inputs; no instance, no run, no model."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from middo_pipeline.assets.merging import MergeConfig, optimized_dataset
from middo_pipeline.core.merge import UNREPAIRED_TABLE, check_conservation
from middo_pipeline.core.schema import SAMPLE_SCHEMA, fingerprint, make_samples
from middo_pipeline.resources import EvaluationResource, StorageResource
from middo_pipeline_tests.core.test_merge import refined_row, refined_table

N = 10  # an extension is 10 % growth: within the default max_growth (0.15)
N_ITEMS = 40  # held-out items in the fake round_evaluation tables


@pytest.fixture
def round1() -> pl.DataFrame:
    rows = [{"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}."} for i in range(N)]
    return make_samples(rows, round_number=1, operation="kept").with_columns(pl.col("sample_id").alias("origin_id"))


def _embedding_signals(ds: pl.DataFrame, sparse: tuple[int, ...] = ()) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sample_id": ds["sample_id"],
            "is_sparse": [i in sparse for i in range(ds.height)],
            "knn_mean_similarity": [0.5 - 0.01 * i for i in range(ds.height)],
        }
    )


def _merge(partition_key: str, storage_root, round_dataset, refined, embedding, **evaluation) -> dict:
    """optimized_dataset called directly; its outputs and check results by name."""
    with dg.build_asset_context(partition_key=partition_key) as context:
        events = list(
            optimized_dataset(
                context,
                config=MergeConfig(),
                storage=StorageResource(root=str(storage_root)),
                evaluation=EvaluationResource(**evaluation),
                round_dataset=round_dataset,
                refined_samples=refined,
                embedding_signals=embedding,
            )
        )
    outputs = {e.output_name: e for e in events if isinstance(e, dg.Output)}
    checks = {e.check_name: e for e in events if isinstance(e, dg.AssetCheckResult)}
    assert set(outputs) == {"optimized_dataset", "sample_accounting"}
    assert set(checks) == {"schema_and_provenance", "conservation", "size_policy"}
    return {"outputs": outputs, "checks": checks}


def _fates(accounting: pl.DataFrame) -> dict[str, str]:
    return dict(accounting.select("sample_id", "fate").iter_rows())


def test_merge_replaces_extends_and_accounts_for_every_sample(round1, tmp_path):
    refined = refined_table(
        [
            refined_row(round1, 1, "simplified"),
            refined_row(round1, 2, "rewritten", ok=False, reason="verification: still hard"),
            refined_row(round1, 3, "extended"),
        ]
    )
    got = _merge("round-1", tmp_path, round1, refined, _embedding_signals(round1, sparse=(3,)))
    ds = got["outputs"]["optimized_dataset"].value
    accounting = got["outputs"]["sample_accounting"].value

    assert ds.schema == pl.Schema(SAMPLE_SCHEMA)
    assert ds.height == N + 1  # one replaced in place, one extension added
    sid = round1["sample_id"].to_list()
    assert sid[1] not in ds["sample_id"].to_list()
    assert dict(ds.group_by("operation").len().iter_rows()) == {"kept": N - 1, "simplified": 1, "extended": 1}
    assert ds.filter(pl.col("operation") != "kept")["origin_id"].sort().to_list() == sorted([sid[1], sid[3]])

    fates = _fates(accounting)
    assert set(fates) == set(sid)  # every input sample accounted for, once
    assert fates[sid[1]] == "replaced" and fates[sid[2]] == "kept_failed" and fates[sid[3]] == "kept+extended"
    assert accounting.filter(pl.col("sample_id") == sid[2])["failure_reason"][0].endswith("still hard")

    checks = got["checks"]
    assert all(c.passed for c in checks.values())
    assert checks["conservation"].metadata["input_samples"].value == N
    assert check_conservation(round1, ds, accounting) == []

    md = got["outputs"]["optimized_dataset"].metadata
    assert md["rolled_back"].value is False
    assert md["rows_before"].value == N and md["rows_after"].value == N + 1
    assert md["fingerprint"].value == fingerprint(ds)
    by_fate = got["outputs"]["sample_accounting"].metadata["by_fate"].value
    assert by_fate == {"kept": N - 3, "kept+extended": 1, "kept_failed": 1, "replaced": 1}


def _evaluation_table(correct: bool) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": [f"q{i}" for i in range(N_ITEMS)], "correct": [correct] * N_ITEMS, "loss": [1.0] * N_ITEMS}
    )


@pytest.mark.parametrize("on_regression", ["rollback", "keep"])
def test_a_round_that_trained_a_worse_model_is_rolled_back(round1, tmp_path, on_regression):
    """Round-2's input holds round-1's refinement; its model answers every held-out item wrong where
    round-1's answered them right: rolled back to round-1's data, unless on_regression is keep."""
    refined1 = refined_table([refined_row(round1, 1, "simplified")])
    round2 = _merge("round-1", tmp_path, round1, refined1, _embedding_signals(round1))["outputs"]
    round2 = round2["optimized_dataset"].value
    storage = StorageResource(root=str(tmp_path)).get()
    storage.write_table(round1, storage.table_path("round_dataset", "round-1"))
    storage.write_table(_evaluation_table(True), storage.table_path("round_evaluation", "round-1"))
    storage.write_table(_evaluation_table(False), storage.table_path("round_evaluation", "round-2"))

    refined2 = refined_table([refined_row(round2, 0, "rewritten")])
    got = _merge("round-2", tmp_path, round2, refined2, _embedding_signals(round2), on_regression=on_regression)
    ds = got["outputs"]["optimized_dataset"].value
    accounting = got["outputs"]["sample_accounting"].value
    md = got["outputs"]["optimized_dataset"].metadata

    assert all(c.passed for c in got["checks"].values())
    assert check_conservation(round2, ds, accounting) == []
    assert set(_fates(accounting)) == set(round2["sample_id"].to_list())
    if on_regression == "rollback":
        assert md["rolled_back"].value is True
        assert sorted(ds["sample_id"].to_list()) == sorted(round1["sample_id"].to_list())
        assert "withdrawn" in set(_fates(accounting).values())
    else:
        assert md["rolled_back"].value is False
        assert "on_regression: keep" in md["regression_decision"].value
        assert "rewritten" in ds["operation"].to_list()
    assert storage.table_path(UNREPAIRED_TABLE, "round-2").exists()
