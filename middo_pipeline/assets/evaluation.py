"""How good is this round's checkpoint? Held-out loss and multiple-choice accuracy, beside the base model."""

import hashlib
import json
from pathlib import Path

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from middo_pipeline.assets._meta import bars_md, image_md, tidy
from middo_pipeline.constants import MAX_LENGTH
from middo_pipeline.core.checkpoints import derived_key, find_derived, source_digest
from middo_pipeline.core.evaluation import METRICS, compare_rounds, evaluate, load_eval_set, metrics_by_round
from middo_pipeline.core.plots import metric_by_round_png
from middo_pipeline.core.progress import ProgressLogger
from middo_pipeline.core.readout_cache import model_identity
from middo_pipeline.core.rollback import worse_beyond_floor
from middo_pipeline.resources import EvaluationResource, ModelResource, StorageResource
from middo_pipeline.rounds import earlier_rounds, previous_table, round_number, rounds_partitions

NO_REGRESSION = "no_regression"
# what the downstream benchmark's placebo measured (docs/decisions/rollback-floor.md)
RESOLUTION = (
    "one training run per round, items resampled: training order alone is not in the interval. In the downstream "
    "benchmark, the seed data's own rows in another order moved MC accuracy by -0.008 with an item interval "
    "[-0.015, -0.002] that leaves out 0 (5 training seeds; over 10 seeds, response loss by -0.0024 [-0.0036, "
    "-0.0014]). Before acting on a flagged change of that size, train the round again "
    "with another sft_checkpoint seed and compare"
)


class EvalConfig(Config):
    max_length: int = Field(default=MAX_LENGTH, description="Tokens per held-out item (prompt + answer)")


def _base_figures(store, model: ModelResource, eval_df: pl.DataFrame, eval_path: str, max_length: int, log) -> dict:
    """The base model's figures, computed once per (base model, eval file) and cached: keyed by
    the model's identity (its files and load settings) and the whole eval file's hash."""
    identity = model_identity(model.base_model, model.base_path(), model.load_kwargs())
    key = hashlib.sha256(
        json.dumps(
            [identity, hashlib.sha256(Path(eval_path).read_bytes()).hexdigest(), eval_df.height, max_length]
        ).encode()
    ).hexdigest()[:16]
    path = store.ensure_dir(store.cache_dir / "base_eval") / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    lm = model.load()
    res = evaluate(
        lm.model, lm.tokenizer, eval_df, max_length=max_length, progress=ProgressLogger(log, "base model eval")
    )
    figures = {m: float(res[m]) for m in METRICS}
    with store.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(figures))
    return figures


@asset(
    partitions_def=rounds_partitions,
    group_name="evaluate",
    kinds={"pytorch", "polars"},
    deps=["sft_checkpoint"],
    description="This round's checkpoint on the held-out set (mean response loss, multiple-choice accuracy by log-likelihood), beside the base model; plotted across rounds.",
    check_specs=[
        AssetCheckSpec(
            NO_REGRESSION,
            asset="round_evaluation",
            description="Warns when this round's data trained a significantly worse model than the previous round's "
            "(held-out items paired: MC accuracy or response loss, 95% bootstrap interval below zero). The interval "
            "is over items of one training run per round: it leaves out training-order noise, so a small flagged "
            "change may be order alone (see the check's 'resolution')",
        )
    ],
)
def round_evaluation(
    context: AssetExecutionContext,
    config: EvalConfig,
    model: ModelResource,
    storage: StorageResource,
    evaluation: EvaluationResource,
):
    store, key = storage.get(), context.partition_key
    eval_path = evaluation.heldout_path
    eval_df = load_eval_set(eval_path)
    reuse_key = _reuse_key(store.checkpoint_dir(key), eval_path, config, model)
    items, res, reused_from = _evaluate_or_reuse(context, store, model, eval_df, reuse_key, config.max_length)
    base = _base_figures(store, model, eval_df, eval_path, config.max_length, context.log.info)
    summary = {m: float(res[m]) for m in METRICS} | {"n_items": int(res["n_items"]), "reuse_key": reuse_key}
    with store.atomic_path(store.ensure_dir(store.artifact_dir("round_evaluation", key)) / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary))
    earlier = [(round_number(q), _summary(store, q)) for q in earlier_rounds(key)]
    by_round = metrics_by_round(earlier, round_number(key), res)
    prev_path = previous_table(store, "round_evaluation", key)
    vs_prev = compare_rounds(pl.read_parquet(prev_path), items) if prev_path and prev_path.exists() else None
    yield Output(items, metadata=_evaluation_metadata(res, base, eval_path, reused_from, by_round, vs_prev))
    yield _regression_check(vs_prev)


def _reuse_key(ckpt: Path, eval_path: str, config: EvalConfig, model: ModelResource) -> str | None:
    """The same weights on the same items give the same figures: a round whose checkpoint is an
    earlier round's (sft_checkpoint reuse_identical) reads that round's evaluation."""
    return derived_key(
        ckpt,
        asset="round_evaluation",
        eval_file=hashlib.sha256(Path(eval_path).read_bytes()).hexdigest(),
        max_length=config.max_length,
        load=model.load_kwargs(),
        code=source_digest("core/evaluation.py", "core/forward.py", "core/model_parts.py", "models/loading.py"),
    )


def _summary(store, partition_key: str) -> dict | None:
    """A round's recorded evaluation figures (``summary.json``), or None when it has none."""
    path = store.artifact_dir("round_evaluation", partition_key) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _evaluate_or_reuse(
    context, store, model: ModelResource, eval_df: pl.DataFrame, reuse_key: str | None, max_length: int
) -> tuple[pl.DataFrame, dict, str | None]:
    """(per-item table, figures, the round read instead of evaluating, or None): an earlier
    round's evaluation under the same reuse key, else this round's checkpoint evaluated."""
    key = context.partition_key
    same = find_derived(
        (
            (q, store.artifact_dir("round_evaluation", q) / "summary.json", store.table_path("round_evaluation", q))
            for q in reversed(earlier_rounds(key))
        ),
        reuse_key,
    )
    if same is not None and pl.read_parquet(same[1]).height == eval_df.height:
        reused_from, table, recorded = same
        context.log.info(
            f"{key}'s checkpoint has the weights {reused_from}'s was evaluated with (same training "
            f"key), on the same held-out file and settings: its evaluation is read, not recomputed"
        )
        return pl.read_parquet(table), {m: recorded[m] for m in METRICS} | {"n_items": recorded["n_items"]}, reused_from
    lm = model.load(str(store.checkpoint_dir(key)))
    res = evaluate(
        lm.model,
        lm.tokenizer,
        eval_df,
        max_length=max_length,
        progress=ProgressLogger(context.log.info, "held-out eval"),
    )
    return res["items"], res, None


def _change_vs_previous(vs_prev: dict | None) -> dict:
    """The metadata entries that compare this round with the previous one (none in round 1)."""
    if not (vs_prev and vs_prev["items"]):
        return {}
    mc, loss = vs_prev["mc_accuracy"], vs_prev["response_loss"]
    return {
        "mc_accuracy_change_vs_previous_round": mc["mean"],
        "mc_accuracy_change_vs_previous_round_ci95": json.dumps([round(x, 4) for x in mc["ci95"]]),
        "loss_change_vs_previous_round": loss["mean"],  # previous − this: > 0 better
        "worse_than_previous_round": bool(vs_prev["worse"]),
    }


def _evaluation_metadata(
    res: dict, base: dict, eval_path: str, reused_from: str | None, by_round: tuple, vs_prev: dict | None
) -> dict:
    """round_evaluation's metadata: the figures beside the base model's, across rounds, and the
    change since the previous round."""
    rounds, series = by_round
    return tidy(
        {
            "mean_response_loss": float(res["mean_response_loss"]),
            "mc_accuracy": float(res["mc_accuracy"]),
            "base_mean_response_loss": base["mean_response_loss"],
            "base_mc_accuracy": base["mc_accuracy"],
            "delta_mc_accuracy_vs_base": float(res["mc_accuracy"]) - base["mc_accuracy"],
            "delta_loss_vs_base": float(res["mean_response_loss"]) - base["mean_response_loss"],
            "n_items": int(res["n_items"]),
            "eval_set": MetadataValue.path(str(Path(eval_path).resolve())),
            **({"reused_from": reused_from} if reused_from else {}),
            "by_round": image_md(
                metric_by_round_png(rounds, series | {f"base_{m}": [base[m]] * len(rounds) for m in METRICS}),
                "held-out metrics by round",
            ),
            "mc_accuracy_by_round": bars_md(
                [("base model", base["mc_accuracy"])]
                + [(f"round-{n}", v) for n, v in zip(rounds, series["mc_accuracy"])],
                "held-out accuracy",
                fmt="{:.3f}",
            ),
            **_change_vs_previous(vs_prev),
        },
        first=(
            "mc_accuracy",
            "mc_accuracy_change_vs_previous_round",
            "delta_mc_accuracy_vs_base",
            "mean_response_loss",
            "delta_loss_vs_base",
            "mc_accuracy_by_round",
        ),
    )


def _regression_check(vs_prev: dict | None) -> AssetCheckResult:
    if vs_prev is None:
        return AssetCheckResult(
            check_name=NO_REGRESSION,
            asset_key="round_evaluation",
            passed=True,
            metadata={"note": "no previous round to compare with"},
        )
    meta: dict = {"items": vs_prev["items"], "resolution": RESOLUTION}
    for name in ("mc_accuracy", "response_loss"):
        m = vs_prev.get(name)
        if m and m["mean"] is not None:
            meta[f"{name}_change"] = m["mean"]
            meta[f"{name}_change_ci95"] = f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"
    beyond = worse_beyond_floor(vs_prev)
    if vs_prev["worse"]:
        meta["beyond_noise_floor"] = ", ".join(beyond) or "no"
    meta["note"] = vs_prev.get("note") or (
        (
            f"significantly worse than the previous round, beyond the training-order noise floor on {', '.join(beyond)}: "
            "this round's optimized_dataset rolls its data back (on_regression: rollback, default floors)"
            if beyond
            else "significantly worse than the previous round by the item interval, but within what training order "
            "alone moves it (the noise floor, core.rollback.ROLLBACK_NOISE_FLOOR): not rolled back; retrain with another "
            "seed to tell"
        )
        if vs_prev["worse"]
        else "not significantly worse than the previous round (> 0: better; loss change = previous − this)"
    )
    return AssetCheckResult(
        check_name=NO_REGRESSION,
        asset_key="round_evaluation",
        passed=not vs_prev["worse"],
        severity=AssetCheckSeverity.WARN,
        metadata=meta,
    )
