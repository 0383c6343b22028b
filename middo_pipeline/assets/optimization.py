"""Steps 3 and 4 of the loop: the optimizer LLM rewrites flagged samples; the merge builds D_{r+1}."""

import time
from dataclasses import fields
from pathlib import Path
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
    multi_asset,
)
from pydantic import Field

from middo_pipeline.assets._checks import schema_check, schema_spec
from middo_pipeline.assets._meta import bars_md, json_md, preview_md, tidy
from middo_pipeline.core.checkpoints import require_checkpoint
from middo_pipeline.core.evaluation import compare_rounds, load_eval_set
from middo_pipeline.core.gate import gate_round, stage_counts
from middo_pipeline.core.merge import SizePolicy, check_conservation, merge_round
from middo_pipeline.core.optimizer.operations import plan_operations, run_operations
from middo_pipeline.core.optimizer.prompts import PromptConfig, PromptStyle
from middo_pipeline.core.optimizer.style import choose_style
from middo_pipeline.core.progress import ProgressLogger
from middo_pipeline.core.rollback import ROLLBACK_NOISE_FLOOR, regression_verdict, rollback_round
from middo_pipeline.core.schema import fingerprint
from middo_pipeline.core.verify import (
    DEFAULT_DUPLICATE_COSINE,
    DEFAULT_MAX_FLUENCY_LOSS,
    DEFAULT_MAX_IFD,
    DEFAULT_NEW_TASK_GAIN,
    DEFAULT_REPAIR_GAIN,
    DEFAULT_SAME_TASK_COSINE,
    GateRules,
    choose_candidates,
    ngram_set,
    resolve_acceptance_bar,
)
from middo_pipeline.packaged import HELDOUT, data_file
from middo_pipeline.resources import ModelResource, OptimizerResource, RayComputeResource, StorageResource
from middo_pipeline.rounds import (
    latest_materialization,
    previous_round,
    previous_table,
    round_number,
    rounds_partitions,
)

DEFAULT_EVAL = data_file(HELDOUT)


class RefineConfig(Config):
    simplify: bool = Field(default=True, description="Simplify hard samples (complexity signal)")
    extend: bool = Field(
        default=True, description="Extend sparse samples (diversity signal); not those also low quality"
    )
    rewrite: bool = Field(default=True, description="Rewrite low-quality samples (quality signal)")
    prompt_style: Literal["auto", PromptStyle] = Field(
        default="auto",
        description="direct (small models) | stepwise (strong models) | auto: by the model's size when known (local), else by a one-call probe of the stepwise format",
    )
    max_prompt_tokens: int | None = Field(
        default=None, description="Max new tokens for a new prompt (default 160 direct, 768 stepwise)"
    )
    max_response_tokens: int = Field(default=192, description="Max new tokens for a new response")
    candidates: int = Field(
        default=2, ge=1, description="Candidates generated per flagged sample (k); the gate keeps the best that passes"
    )
    temperature: float = Field(
        default=0.7, ge=0.0, description="Sampling temperature of the candidates (> 0 when candidates > 1)"
    )
    seed: int = Field(default=0, description="Base seed: candidate c of round r samples with seed + 1000·r + c")
    verify: bool = Field(
        default=True,
        description="Verified refinement: re-score every candidate with the round's models and thresholds; accept only fixes (off: the first candidate is taken unchecked)",
    )
    duplicate_cosine: float = Field(
        default=DEFAULT_DUPLICATE_COSINE,
        gt=0.0,
        le=1.0,
        description="With duplicate_same_task off: an extension this similar (cosine, in the round's embedding space) "
        "to any round sample is a near-duplicate",
    )
    duplicate_same_task: bool = Field(
        default=True,
        description="An extension is a near-duplicate of a round sample that reads as the same task (every content "
        "word of one prompt in the other, or answers sharing half their content words) among its 16 nearest, at "
        "same_task_cosine or more: the prompt embedding follows wording more than task (a new question on the same "
        "template is 0.99 alike, a reworded paraphrase 0.55-0.99). Off: any sample at duplicate_cosine or more",
    )
    same_task_cosine: float = Field(
        default=DEFAULT_SAME_TASK_COSINE,
        ge=0.0,
        le=1.0,
        description="With duplicate_same_task: how similar (cosine) a same-task sample must be to count "
        "(distinct prompts' 99th percentile is 0.49)",
    )
    new_task: bool = Field(
        default=True,
        description="An extension must be a new task: its prompt and its origin's each explain their own answer better "
        "(base model, nats per response token) than the other's answer, by more than new_task_gain. A paraphrase of "
        "the origin fails (its prompts are interchangeable), and so does an unrelated or garbled answer",
    )
    new_task_gain: float = Field(
        default=DEFAULT_NEW_TASK_GAIN,
        description="With new_task: the margin (nats per token) each prompt must explain its own answer by",
    )
    near_origin: bool = Field(
        default=True,
        description="A candidate must be at least as similar to the sample it was made from as that sample's k nearest "
        "neighbours are on average (a rewrite that changed the task, an extension outside the sparse region, is rejected)",
    )
    repair: bool = Field(
        default=True,
        description="With near_origin: a simplification or rewrite farther from its origin is still accepted when its "
        "prompt explains the origin's answer better than the origin's own prompt and than no prompt, by more than repair_gain (base "
        "model, nats per response token), and reads at least as fluently (prompt-free loss; a scramble does not): the "
        "repair of a garbled or truncated prompt, which the embedding puts far from the garbled original",
    )
    repair_gain: float = Field(
        default=DEFAULT_REPAIR_GAIN,
        description="With repair: the margin (nats per token) by which the candidate's prompt must explain the origin's "
        "answer better (0.2: measured on the gate benchmark's one stored round, benchmarks/README)",
    )
    max_ifd: float | None = Field(
        default=DEFAULT_MAX_IFD,
        gt=0.0,
        description="A candidate whose prompt does not help explain its answer is rejected: its IFD (response loss given "
        "the prompt / response loss alone, base model) is this or more, whatever the round's quality threshold (a "
        "round with many defective rows sets a lax one, under which a fluent answer to another question passes). "
        "0.95: chosen on two of the gate benchmark's stored rounds, checked on a third (benchmarks/README, run 7); "
        "null: no ceiling",
    )
    max_fluency_loss: float | None = Field(
        default=DEFAULT_MAX_FLUENCY_LOSS,
        ge=0.0,
        description="A simplification or rewrite whose new prompt reads worse than its origin's by more than this (nats "
        "per token of prompt-free loss, base model) is rejected: a scramble of a clean prompt whose words still explain "
        "the answer passes the IFD and quality rules. 3: chosen on three of the gate benchmark's rounds, checked on a "
        "fourth (benchmarks/README, run 9); null: no floor",
    )
    acceptance_bar: Literal["auto", "flag", "typical"] = Field(
        default="auto",
        description="flag: an accepted candidate no longer carries the flag it was made to fix and gets no new one "
        "(the method's rule) | typical: it must also be no harder after training than the round's median sample "
        "and of at least its median quality (conservative: for a weak optimizer, whose 'unflagged' outputs are "
        "mostly worse than typical rows) | auto: typical for an optimizer that cannot follow the stepwise prompt "
        "(below 3B parameters when its size is known, else by the prompt-style probe), flag for one that can",
    )
    cascade: bool = Field(
        default=True,
        description="A candidate whose base-model readings already reject it (IFD at or above max_ifd; with quality "
        "mode ifd, quality below the round's bar) is read no further: no cross-prompt, checkpoint or self-judge pass "
        "(the same verdicts; refinement_candidates then holds only those readings for it, column gate_stage). Off: "
        "every candidate is read in full",
    )
    skip_on_rollback: bool = Field(
        default=True,
        description="When the merge will roll this round back (its data trained a worse model than the previous "
        "round's: optimized_dataset's on_regression and noise floors as this run configures them), generate "
        "nothing: the merge would discard the refinements. false: generate and verify them anyway, for inspection",
    )
    heldout_path: str = Field(default=str(DEFAULT_EVAL), description="Held-out set whose text candidates must not copy")
    heldout_ngram: int = Field(
        default=8, ge=3, description="A candidate sharing a run of this many words with the held-out set is rejected"
    )

    def gate_rules(self, bar: str = "flag") -> GateRules:
        """The gate's rule settings, as ``core.gate.round_thresholds`` and ``gate_round`` take
        them, under the acceptance ``bar`` (resolved per round: never ``auto`` here)."""
        return GateRules(**{f.name: getattr(self, f.name) for f in fields(GateRules) if f.name != "bar"}, bar=bar)


def _stages(verified: pl.DataFrame) -> dict:
    """``gate.stage_counts``, named for the UI."""
    names = {"text": "text rules (no forward pass)", "base": "base-model readings (no checkpoint pass)"}
    return {names.get(k, "read in full"): n for k, n in stage_counts(verified).items()}


def _heldout_grams(path: str, n: int) -> set:
    p = Path(path)
    if not p.exists():
        return set()
    df = load_eval_set(str(p))
    return ngram_set(df["instruction"].to_list() + df["input"].to_list() + df["output"].to_list(), n)


@multi_asset(
    partitions_def=rounds_partitions,
    group_name="optimize",
    # the round's evaluation says whether the merge will roll the round back: then nothing is
    # generated (skip_on_rollback). Read from storage, like optimized_dataset does
    deps=["round_evaluation"],
    outs={
        "refinement_candidates": AssetOut(
            kinds={"polars"},
            description="Every optimizer candidate (k per flagged sample), re-scored with the round's models: losses, "
            "IFD, quality value, similarity to the round; passed or the reasons it was rejected.",
        ),
        "refined_samples": AssetOut(
            kinds={"polars"},
            description="One row per flagged sample and operation (hard → simplified, low quality → rewritten, "
            "sparse → extended): the accepted candidate (status ok), or rejected with the reason "
            "('verification: still hard', ...), or failed. Before and after, signals before and after.",
        ),
    },
    check_specs=[
        AssetCheckSpec(
            "optimizer_calls",
            asset="refined_samples",
            description="The optimizer produced at least one usable candidate when operations were planned "
            "(every call failing means a broken backend or a prompt style the model cannot follow)",
        )
    ],
)
def refined_samples(
    context: AssetExecutionContext,
    config: RefineConfig,
    optimizer: OptimizerResource,
    model: ModelResource,
    storage: StorageResource,
    ray: RayComputeResource,
    round_dataset: pl.DataFrame,
    model_readouts: pl.DataFrame,
    loss_signals: pl.DataFrame,
    embedding_signals: pl.DataFrame,
    quality_signals: pl.DataFrame,
):
    r = round_number(context.partition_key)
    store = storage.get()

    def flagged(df: pl.DataFrame, column: str, enabled: bool) -> list[str]:
        return df.filter(pl.col(column))["sample_id"].to_list() if enabled else []

    hard = flagged(loss_signals, "is_hard", config.simplify)
    low = flagged(quality_signals, "is_low_quality", config.rewrite)
    sparse = flagged(embedding_signals, "is_sparse", config.extend)
    neighbors = dict(zip(embedding_signals["sample_id"].to_list(), embedding_signals["neighbor_ids"].to_list()))
    plan = plan_operations(round_dataset, hard, low, sparse, neighbors)
    both = len(set(hard) & set(low))
    not_extended = len(set(sparse) & set(low))
    context.log.info(
        f"{plan.height} operations planned: hard={len(hard)} low_quality={len(low)} sparse={len(sparse)} "
        f"(hard and low quality: {both}, rewritten; sparse and low quality: {not_extended}, not extended)"
    )
    rollback, rollback_decision, _ = _rollback_decision(
        store, context.partition_key, round_dataset, _merge_config(context)
    )
    skipped = plan.height if rollback and config.skip_on_rollback else 0
    if skipped:
        context.log.warning(
            f"{context.partition_key}: {skipped} planned operations not generated: {rollback_decision}. "
            f"optimized_dataset will hand on {previous_round(context.partition_key)}'s data, so this round's "
            "refinements would not be merged (skip_on_rollback: false generates them anyway)"
        )
        plan = plan.clear()

    backend = optimizer.make_backend(store, ray=ray, log=context.log.info)
    if config.prompt_style == "auto" and plan.height:
        style, style_reason = choose_style(backend)
        context.log.info(f"prompt style {style} ({style_reason})")
    else:
        style = optimizer.default_style() if config.prompt_style == "auto" else config.prompt_style
        style_reason = "configured" if config.prompt_style != "auto" else "nothing to refine"
    max_prompt = config.max_prompt_tokens or (160 if style == "direct" else 768)
    bar, bar_reason = _acceptance_bar(config, backend, style, style_reason, planned=plan.height > 0)
    if config.verify and plan.height:
        context.log.info(f"acceptance bar {bar} ({bar_reason})")
    k = config.candidates
    temperature = config.temperature if k > 1 or config.temperature > 0 else 0.0
    prompt_cfg = PromptConfig(
        style=style,
        max_prompt_tokens=max_prompt,
        max_response_tokens=config.max_response_tokens,
        temperature=temperature,
        seed=config.seed + 1000 * r,
    )
    t0 = time.perf_counter()
    candidates = run_operations(
        round_dataset,
        plan,
        neighbors,
        backend,
        prompt_cfg,
        round_number=r,
        candidates=k,
        progress=ProgressLogger(context.log.info, "optimizer calls", unit="calls"),
    )
    gen_seconds = time.perf_counter() - t0
    close = getattr(getattr(backend, "backend", backend), "close", None)
    if ray.enabled and close is not None:
        close()  # free the Ray workers' CPUs/GPUs for the re-scoring pools

    t0 = time.perf_counter()
    if config.verify and candidates.height:
        ckpt = store.checkpoint_dir(context.partition_key)
        require_checkpoint(ckpt, context.partition_key, fingerprint(round_dataset))
        mode = quality_signals["quality_mode"][0]
        judge_lm = model.load(str(ckpt)) if mode in ("judge", "combined") else None
        verified, th = gate_round(
            candidates,
            model_readouts=model_readouts,
            loss_signals=loss_signals,
            quality_signals=quality_signals,
            embedding_signals=embedding_signals,
            base=lambda: ray.forward(model, log=context.log.info),
            checkpoint=lambda: ray.forward(model, str(ckpt), log=context.log.info),
            judge_model=judge_lm,
            rules=config.gate_rules(bar),
            round_dataset=round_dataset,
            heldout_grams=_heldout_grams(config.heldout_path, config.heldout_ngram),
            ngram=config.heldout_ngram,
            cascade=config.cascade,
            log=context.log.warning,
            progress=lambda name: ProgressLogger(context.log.info, name),
        )
        del judge_lm
        chosen = choose_candidates(verified)
    else:  # the gate is off: the first candidate of each operation, unchecked (what the reference does)
        th = None
        verified = candidates.with_columns(
            pl.col("status").eq("ok").alias("passed"), pl.lit(None, dtype=pl.String).alias("reasons")
        )
        chosen = verified.filter(pl.col("candidate") == 0).with_columns(
            pl.lit(k, dtype=pl.Int64).alias("n_candidates"), pl.col("passed").cast(pl.Int64).alias("n_passed")
        )
    gate_seconds = time.perf_counter() - t0

    ok = chosen.filter(pl.col("status") == "ok")
    rejected = chosen.filter(pl.col("status") == "rejected")
    failed = chosen.filter(pl.col("status") == "failed")
    generated = verified.filter(pl.col("status") == "ok")
    if ok.height == 0 and chosen.height:
        context.log.warning(
            f"{context.partition_key}: no refinement was accepted ({rejected.height} rejected, "
            f"{failed.height} failed): the round keeps its samples unchanged"
        )
    by_reason = (
        verified.filter(~pl.col("passed"))
        .with_columns(
            pl.col("reasons").fill_null(pl.col("failure_reason")).str.split("; ").list.first().alias("reason")
        )
        .group_by("operation", "reason")
        .len()
        .sort("operation", "reason")
    )
    signals_cols = [
        "operation",
        "origin_id",
        "loss_after_original",
        "loss_after",
        "quality_value_original",
        "quality_value",
        "ifd",
        "max_cosine",
        "max_cosine_same_task",
        "new_task_gain",
        "repair_gain",
        "prompt_fluency_gain",
        "cosine_original",
        "neighbor_similarity_original",
        "instruction_before",
        "instruction_after",
        "output_after",
    ]
    stats = backend.stats()
    context.add_output_metadata(
        output_name="refinement_candidates",
        metadata=tidy(
            {
                "candidates": verified.height,
                "generated": generated.height,
                "passed": int(verified["passed"].sum()) if verified.height else 0,
                "per_sample": k,
                "temperature": temperature,
                "rejected_by_reason": json_md({f"{o}: {r_}": n for o, r_, n in by_reason.iter_rows()}),
                "thresholds": json_md(th.as_dict() if th else {"verify": False}),
                "generation_seconds": round(gen_seconds, 1),
                "verification_seconds": round(gate_seconds, 1),
                "settled_by_stage": json_md(_stages(verified)),
                "why_rejected": bars_md(
                    sorted(((f"{o}: {r_}", n) for o, r_, n in by_reason.iter_rows()), key=lambda x: -x[1]),
                    "rejected candidates by reason",
                ),
            },
            first=("passed", "candidates", "why_rejected"),
        ),
    )
    outcome = [
        (f"{op}: {status}", int(((chosen["operation"] == op) & (chosen["status"] == code)).sum()))
        for op in sorted(set(chosen["operation"].to_list()))
        for code, status in (("ok", "accepted"), ("rejected", "rejected"), ("failed", "failed"))
    ]
    context.add_output_metadata(
        output_name="refined_samples",
        metadata=tidy(
            {
                "attempted": chosen.height,
                "skipped_for_rollback": skipped,
                **({"rollback_expected": rollback_decision} if rollback else {}),
                "accepted": ok.height,
                "rejected": rejected.height,
                "failed": failed.height,
                "succeeded": ok.height,  # kept for earlier dashboards: = accepted
                "verified": config.verify,
                "by_operation": json_md(
                    {
                        op: {
                            "accepted": int(((chosen["operation"] == op) & (chosen["status"] == "ok")).sum()),
                            "rejected": int(((chosen["operation"] == op) & (chosen["status"] == "rejected")).sum()),
                            "failed": int(((chosen["operation"] == op) & (chosen["status"] == "failed")).sum()),
                        }
                        for op in sorted(set(chosen["operation"].to_list()))
                    }
                ),
                "rejected_or_failed_by_reason": json_md(
                    dict(
                        chosen.filter(pl.col("status") != "ok")
                        .group_by("failure_reason")
                        .len()
                        .sort("failure_reason")
                        .iter_rows()
                    )
                ),
                "hard_and_low_quality": MetadataValue.text(
                    f"{both} samples flagged hard and low quality: rewritten, not simplified (a sample the model cannot learn "
                    f"and whose prompt does not explain its answer is more likely defective than difficult)"
                ),
                "sparse_not_extended": MetadataValue.text(
                    f"{not_extended} sparse samples are also low quality: not extended (an extension would carry the defect)"
                ),
                "cache": json_md(stats),
                "prompt_style": prompt_cfg.style,
                "prompt_style_reason": style_reason,
                "optimizer": f"{optimizer.backend}:{optimizer.model}",
                "acceptance_bar": bar if config.verify else "none (verify off)",
                "acceptance_bar_reason": bar_reason if config.verify else "verify off: the first candidate is taken",
                "generation_seconds": round(gen_seconds, 1),
                **_generation_rate(stats, gen_seconds),
                "verification_seconds": round(gate_seconds, 1),
                "accepted_before_after": preview_md(ok, signals_cols, n=10),
                "rejected_examples": preview_md(
                    rejected,
                    ["operation", "failure_reason", "instruction_before", "instruction_after", "output_after"],
                    n=10,
                ),
                "failed_examples": preview_md(
                    failed, ["operation", "origin_id", "failure_reason", "instruction_before"], n=5
                ),
                "outcome": bars_md([(label, n) for label, n in outcome if n], "refinements by operation and outcome"),
            },
            first=("accepted", "rejected", "failed", "attempted", "outcome", "accepted_before_after"),
        ),
    )
    yield Output(verified, output_name="refinement_candidates")
    yield Output(chosen, output_name="refined_samples")
    check = optimizer_calls_check(candidates, style)
    if not check.passed:
        context.log.warning(f"{context.partition_key}: {check.description}")
    yield check


def _regression(store, key: str, round_dataset: pl.DataFrame, noise_floor: dict[str, float]) -> tuple[bool, str]:
    """Whether this round's data trained a significantly worse model than the previous round's
    (``core.merge.regression_verdict`` on the two rounds' held-out items), and why. Read from
    storage: a round run without its evaluation is merged as usual, and says so."""
    prev = previous_round(key)
    if prev is None:
        return False, "round-1 trains on the seed: nothing to compare with"
    this = store.table_path("round_evaluation", key)
    if not this.exists():
        return False, f"{key} was not evaluated (round_evaluation): merged without the regression check"
    path = previous_table(store, "round_evaluation", key)
    vs_prev = compare_rounds(pl.read_parquet(path), pl.read_parquet(this)) if path.exists() else None
    return regression_verdict(vs_prev, round_dataset, key, prev, noise_floor=noise_floor)


def _rollback_decision(
    store, key: str, round_dataset: pl.DataFrame, merge: "MergeConfig"
) -> tuple[bool, str, dict[str, float]]:
    """Whether the merge rolls round ``key`` back under ``merge``'s settings, why, and the noise
    floor it used: ``_regression``, then ``on_regression: keep`` overriding a rollback."""
    floor = {"mc_accuracy": merge.rollback_floor_mc_accuracy, "response_loss": merge.rollback_floor_response_loss}
    rollback, decision = _regression(store, key, round_dataset, floor)
    if rollback and merge.on_regression == "keep":
        return False, f"merged anyway (on_regression: keep): {decision}", floor
    return rollback, decision, floor


def _merge_config(context: AssetExecutionContext) -> "MergeConfig":
    """optimized_dataset's settings as this run configures them (its defaults where it does not):
    what refined_samples reads to know whether the merge will roll the round back."""
    ops = (context.run.run_config or {}).get("ops") or {}
    return MergeConfig(**(((ops.get("optimized_dataset") or {}).get("config")) or {}))


def _generation_rate(stats: dict, seconds: float) -> dict:
    """Completion tokens the optimizer generated in this step (cache hits excluded) and their rate
    over the step's generation seconds (prompt passes, parsing and cache reads included): the
    round's own figure beside the generation benchmark's tokens/s. Empty when the backend does
    not count tokens."""
    tokens = stats.get("generated_tokens")
    if tokens is None:
        return {}
    out = {"generated_tokens": int(tokens)}
    if tokens and seconds > 0:
        out["generation_tokens_per_s"] = round(tokens / seconds, 1)
    return out


def _acceptance_bar(config: RefineConfig, backend, style: str, style_reason: str, planned: bool) -> tuple[str, str]:
    """The bar the gate applies, and why. ``auto`` asks what the optimizer can do, as
    ``prompt_style: auto`` does (reusing its answer when the style was chosen that way)."""
    if config.acceptance_bar != "auto":
        return config.acceptance_bar, "configured"
    if not planned or not config.verify:
        return resolve_acceptance_bar("auto", "direct"), "auto; nothing to verify"
    if config.prompt_style != "auto":
        style, style_reason = choose_style(backend)
    bar = resolve_acceptance_bar("auto", style)
    strength = "a strong optimizer" if style == "stepwise" else "a small optimizer"
    return bar, f"auto: {strength} ({style_reason})"


def optimizer_calls_check(candidates: pl.DataFrame, style: str) -> AssetCheckResult:
    """Failed when operations were planned and not one optimizer candidate came out usable (every
    call failed or could not be parsed): a broken backend, or a prompt style the model cannot
    follow; the round's data then stays unchanged, and that must not pass unnoticed."""
    n_generated = int((candidates["status"] == "ok").sum()) if candidates.height else 0
    all_failed = candidates.height > 0 and n_generated == 0
    reasons = (
        dict(
            candidates.filter(pl.col("status") != "ok")
            .group_by("failure_reason")
            .len()
            .sort("len", descending=True)
            .iter_rows()
        )
        if candidates.height
        else {}
    )
    top = "; ".join(f"{r} ({n})" for r, n in list(reasons.items())[:3])
    return AssetCheckResult(
        check_name="optimizer_calls",
        asset_key="refined_samples",
        passed=not all_failed,
        description=(
            f"ALL {candidates.height} optimizer candidates failed (prompt style {style}): {top}"
            if all_failed
            else f"{n_generated} of {candidates.height} optimizer candidates generated"
        ),
        metadata={
            "candidates": candidates.height,
            "generated": n_generated,
            "prompt_style": style,
            "failure_reasons": json_md(reasons),
        },
    )


class MergeConfig(Config):
    size_policy: SizePolicy = Field(
        default="keep",
        description="keep: grow at most max_growth (sparsest extensions first); grow: no cap (the reference)",
    )
    max_growth: float = Field(
        default=0.15, description="With size_policy=keep: the largest allowed growth, as a fraction"
    )
    on_regression: Literal["rollback", "keep"] = Field(
        default="rollback",
        description="When this round's data trained a significantly worse model than the previous round's (the "
        "round_evaluation check no_regression): rollback = the next round gets the previous round's data again (the "
        "refinements that made this round's data are withdrawn, and this round's are not generated "
        "(refined_samples reads this setting from the same run: skip_on_rollback) or not merged); keep = merge as usual",
    )
    rollback_floor_mc_accuracy: float = Field(
        default=ROLLBACK_NOISE_FLOOR["mc_accuracy"],
        ge=0.0,
        description="Roll back only when MC accuracy fell significantly AND by more than this (what training order "
        "alone moves it by; measured on the default, see benchmarks/README.md), or response loss did (next)",
    )
    rollback_floor_response_loss: float = Field(
        default=ROLLBACK_NOISE_FLOOR["response_loss"],
        ge=0.0,
        description="Roll back only when mean response loss rose significantly AND by more than this (nats)",
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
    round_dataset: pl.DataFrame,
    refined_samples: pl.DataFrame,
    embedding_signals: pl.DataFrame,
):
    r = round_number(context.partition_key)
    store = storage.get()
    rollback, decision, floor = _rollback_decision(store, context.partition_key, round_dataset, config)
    if not rollback and not refined_samples.height:
        # refined_samples materialized in another run may have expected a rollback this run does not do
        rec = latest_materialization(context.instance, "refined_samples", context.partition_key)
        md = rec.asset_materialization.metadata if rec and rec.asset_materialization else {}
        if md.get("skipped_for_rollback") and md["skipped_for_rollback"].value:
            decision += (
                f"; refined_samples generated none of its {md['skipped_for_rollback'].value} planned refinements, as "
                "its run expected a rollback: materialize refined_samples in the same run as this setting to merge them"
            )
            context.log.warning(f"{context.partition_key}: {decision}")
    if rollback:
        prev = previous_round(context.partition_key)
        prev_path = previous_table(store, "round_dataset", context.partition_key)
        if not prev_path.exists():
            raise FileNotFoundError(
                f"{context.partition_key}: {decision}; rolling back needs {prev}'s round_dataset at {prev_path}, which "
                f"is missing. Materialize round_dataset for {prev} again, or set on_regression: keep for this run."
            )
        context.log.warning(f"{context.partition_key}: {decision}")
        result = rollback_round(round_dataset, pl.read_parquet(prev_path), round_number=r, reason=decision)
    else:
        sparse_order = embedding_signals.filter(pl.col("is_sparse")).sort("knn_mean_similarity")["sample_id"].to_list()
        result = merge_round(
            round_dataset,
            refined_samples,
            round_number=r,
            size_policy=config.size_policy,
            max_growth=config.max_growth,
            sparse_order=sparse_order,
        )
    problems = check_conservation(round_dataset, result.dataset, result.accounting)
    conservation = AssetCheckResult(
        check_name="conservation",
        asset_key="optimized_dataset",
        passed=not problems,
        metadata={
            "problems": MetadataValue.md("\n".join(f"- {p}" for p in problems[:50]) or "none"),
            "input_samples": round_dataset.height,
        },
    )
    if problems:  # never write a dataset that lost samples
        raise RuntimeError(f"{context.partition_key}: merge lost track of samples: {'; '.join(problems[:5])}")
    ds = result.dataset
    growth = ds.height / max(round_dataset.height, 1) - 1.0
    # the rows the merge removed as exact duplicates, with the row each repeats: kept as data
    dup_path = store.write_table(
        result.duplicates, store.artifact_dir("optimized_dataset", context.partition_key) / "duplicates.parquet"
    )
    changed = refined_samples.filter(pl.col("status") == "ok")
    if rollback:
        withdrawn = round_dataset.filter(pl.col("operation").is_in(list(result.counts["withdrawn_by_operation"])))
        shown = {
            "withdrawn": result.counts["withdrawn"],
            "withdrawn_by_operation": json_md(result.counts["withdrawn_by_operation"]),
            "restored": result.counts["restored"],
            "refinements_not_merged": changed.height,
            "before_after": preview_md(withdrawn, ["operation", "origin_id", "instruction", "output"], n=10),
        }
    else:
        shown = {
            "before_after": preview_md(
                changed, ["operation", "instruction_before", "instruction_after", "output_after"], n=10
            )
        }
    yield Output(
        ds,
        output_name="optimized_dataset",
        metadata=tidy(
            {
                "rolled_back": rollback,
                "regression_decision": decision,
                "on_regression": config.on_regression,
                "rollback_noise_floor": json_md(floor),
                "rows_before": round_dataset.height,
                "rows_after": ds.height,
                "growth": round(growth, 4),
                "size_policy": config.size_policy,
                "counts": json_md(result.counts),
                "duplicates_removed": result.duplicates.height,
                "duplicates": MetadataValue.path(str(dup_path)),
                "rows_by_operation": json_md(dict(ds.group_by("operation").len().sort("operation").iter_rows())),
                "fingerprint": fingerprint(ds),
                **shown,
            },
            first=("rolled_back", "rows_after", "rows_before", "growth", "rows_by_operation", "before_after"),
        ),
    )
    yield schema_check(ds, "optimized_dataset")
    yield conservation
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
