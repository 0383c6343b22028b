"""Step 3 of the loop: the optimizer LLM writes candidates for the flagged samples; the gate keeps
the ones the round's own signals accept."""

import time
from dataclasses import fields
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

from middo_pipeline.assets._meta import bars_md, json_md, preview_md, tidy
from middo_pipeline.assets._rollback import round_verdict
from middo_pipeline.core.checkpoints import require_checkpoint
from middo_pipeline.core.gate import gate_round, stage_counts
from middo_pipeline.core.optimizer.operations import run_operations
from middo_pipeline.core.optimizer.prompts import PromptStyle
from middo_pipeline.core.progress import ProgressLogger
from middo_pipeline.core.refine import (
    RefinementPlan,
    acceptance_bar,
    failure_counts,
    gate_and_choose,
    heldout_grams,
    none_accepted,
    outcomes_by_operation,
    plan_refinements,
    prompt_config,
    prompt_style,
    rejections_by_reason,
    withhold_for_rollback,
)
from middo_pipeline.core.rollback import RollbackVerdict
from middo_pipeline.core.schema import fingerprint
from middo_pipeline.core.text_rules import DEFAULT_NGRAM
from middo_pipeline.core.verify import (
    DEFAULT_MAX_FLUENCY_LOSS,
    DEFAULT_MAX_IFD,
    DEFAULT_NEW_TASK_GAIN,
    DEFAULT_REPAIR_GAIN,
    DEFAULT_SAME_TASK_COSINE,
    GateRules,
)
from middo_pipeline.resources import (
    EvaluationResource,
    ModelResource,
    OptimizerResource,
    RayComputeResource,
    StorageResource,
)
from middo_pipeline.rounds import previous_round, round_number, rounds_partitions

# the candidates' signals shown beside their text in the accepted preview
SIGNAL_COLUMNS = [
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


class GateConfig(Config):
    """Advanced: the gate's rule margins. The defaults were chosen by measurement
    (docs/decisions/gate-rules.md); a user rarely changes them."""

    same_task_cosine: float = Field(
        default=DEFAULT_SAME_TASK_COSINE,
        ge=0.0,
        le=1.0,
        description="An extension is a near-duplicate of a round sample that reads as the same task at this cosine or more",
    )
    new_task: bool = Field(default=True, description="An extension must be a new task, not its origin's again")
    new_task_gain: float = Field(
        default=DEFAULT_NEW_TASK_GAIN,
        description="With new_task: nats per token by which each prompt must explain its own answer better",
    )
    near_origin: bool = Field(
        default=True,
        description="A candidate must be as similar to its origin as the origin's k nearest neighbours are on average",
    )
    repair: bool = Field(
        default=True,
        description="With near_origin: a farther simplification or rewrite is accepted when it repairs its origin's prompt",
    )
    repair_gain: float = Field(
        default=DEFAULT_REPAIR_GAIN,
        description="With repair: nats per token by which the new prompt must explain the origin's answer better",
    )
    max_ifd: float | None = Field(
        default=DEFAULT_MAX_IFD,
        gt=0.0,
        description="A candidate whose IFD (base model) is this or more is rejected; null: no ceiling",
    )
    max_fluency_loss: float | None = Field(
        default=DEFAULT_MAX_FLUENCY_LOSS,
        ge=0.0,
        description="Nats per token a new prompt may read worse than its origin's; null: no floor",
    )
    heldout_ngram: int = Field(
        default=DEFAULT_NGRAM,
        ge=3,
        description="A candidate sharing this many words in a row with the held-out set is rejected",
    )

    def rules(self, bar: str = "flag") -> GateRules:
        """These margins as ``core.verify.GateRules``, under the acceptance ``bar`` (resolved per
        round: never ``auto`` here); the rest of GateRules keeps its defaults."""
        return GateRules(
            **{f.name: getattr(self, f.name) for f in fields(GateRules) if f.name in type(self).model_fields}, bar=bar
        )


class RefineConfig(Config):
    simplify: bool = Field(default=True, description="Simplify hard samples (complexity signal)")
    extend: bool = Field(
        default=True, description="Extend sparse samples (diversity signal); not those also low quality"
    )
    rewrite: bool = Field(default=True, description="Rewrite low-quality samples (quality signal)")
    prompt_style: Literal["auto", PromptStyle] = Field(
        default="auto",
        description="direct (small models) | stepwise (strong models) | auto: by the model's size, else by a probe",
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
    acceptance_bar: Literal["auto", "flag", "typical"] = Field(
        default="auto",
        description="flag: no longer flagged | typical: also no worse than the round's median sample | auto: typical "
        "for a small optimizer, flag for one that follows the stepwise prompt (docs/decisions/acceptance-bar.md)",
    )
    gate: GateConfig = Field(
        default_factory=GateConfig, description="Advanced: the gate's rule margins (docs/decisions/gate-rules.md)"
    )

    def gate_rules(self, bar: str = "flag") -> GateRules:
        return self.gate.rules(bar)


@multi_asset(
    partitions_def=rounds_partitions,
    group_name="optimize",
    # the round's evaluation says whether the merge will roll the round back: then nothing is
    # generated. Read from storage, like optimized_dataset does
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
    evaluation: EvaluationResource,
    round_dataset: pl.DataFrame,
    model_readouts: pl.DataFrame,
    loss_signals: pl.DataFrame,
    embedding_signals: pl.DataFrame,
    quality_signals: pl.DataFrame,
):
    key, store = context.partition_key, storage.get()
    signals = dict(
        model_readouts=model_readouts,
        loss_signals=loss_signals,
        quality_signals=quality_signals,
        embedding_signals=embedding_signals,
    )
    plan, verdict, skipped = _plan(context, config, store, evaluation, round_dataset, signals)
    backend = optimizer.make_backend(store, ray=ray, log=context.log.info)
    style, bar, prompt_cfg = _settings(context, config, optimizer, backend, plan.operations.height > 0)
    t0 = time.perf_counter()
    candidates = run_operations(
        round_dataset,
        plan.operations,
        plan.neighbors,
        backend,
        prompt_cfg,
        round_number=round_number(key),
        candidates=config.candidates,
        progress=ProgressLogger(context.log.info, "optimizer calls", unit="calls"),
    )
    gen_seconds = time.perf_counter() - t0
    close = getattr(getattr(backend, "backend", backend), "close", None)
    if ray.enabled and close is not None:
        close()  # free the Ray workers' CPUs/GPUs for the re-scoring pools

    t0 = time.perf_counter()
    verified, chosen, th = gate_and_choose(
        candidates,
        config.candidates,
        lambda: _gate(
            context, config, model, ray, store, candidates, round_dataset, bar[0], evaluation.heldout_path, signals
        ),
    )
    gate_seconds = time.perf_counter() - t0
    if warning := none_accepted(chosen):
        context.log.warning(f"{key}: {warning}")
    seconds = {"generation_seconds": round(gen_seconds, 1), "verification_seconds": round(gate_seconds, 1)}
    context.add_output_metadata(
        output_name="refinement_candidates", metadata=_candidates_metadata(config, verified, th, seconds)
    )
    run = dict(plan=plan, verdict=verdict, skipped=skipped, style=style, bar=bar, stats=backend.stats())
    context.add_output_metadata(
        output_name="refined_samples",
        metadata=_refined_metadata(config, optimizer, chosen, run, seconds, gen_seconds),
    )
    yield Output(verified, output_name="refinement_candidates")
    yield Output(chosen, output_name="refined_samples")
    check = optimizer_calls_check(candidates, style[0])
    if not check.passed:
        context.log.warning(f"{key}: {check.description}")
    yield check


def _plan(context, config: RefineConfig, store, evaluation, round_dataset: pl.DataFrame, signals: dict) -> tuple:
    """(the plan, the rollback verdict, how many planned operations it withholds): nothing is
    generated for a round whose data the merge will roll back."""
    key = context.partition_key
    plan = plan_refinements(
        round_dataset,
        signals["loss_signals"],
        signals["quality_signals"],
        signals["embedding_signals"],
        simplify=config.simplify,
        rewrite=config.rewrite,
        extend=config.extend,
    )
    context.log.info(plan.summary())
    verdict = round_verdict(store, key, round_dataset, evaluation)
    skipped = withhold_for_rollback(plan, verdict)
    if skipped:
        context.log.warning(
            f"{key}: {skipped} planned operations not generated: {verdict.reason}. optimized_dataset will hand on "
            f"{previous_round(key)}'s data, so this round's refinements would not be merged (the evaluation "
            "resource's on_regression: keep merges them)"
        )
    return plan, verdict, skipped


def _settings(context, config: RefineConfig, optimizer: OptimizerResource, backend, planned: bool) -> tuple:
    """((prompt style, why), (acceptance bar, why), the prompts' settings), each logged when chosen."""
    style, style_reason = prompt_style(config.prompt_style, backend, optimizer.default_style(), planned)
    if config.prompt_style == "auto" and planned:
        context.log.info(f"prompt style {style} ({style_reason})")
    bar, bar_reason = acceptance_bar(config.acceptance_bar, config.prompt_style, backend, style, style_reason, planned)
    if planned:
        context.log.info(f"acceptance bar {bar} ({bar_reason})")
    prompt_cfg = prompt_config(
        style,
        round_number(context.partition_key),
        seed=config.seed,
        temperature=config.temperature,
        max_response_tokens=config.max_response_tokens,
        max_prompt_tokens_configured=config.max_prompt_tokens,
    )
    return (style, style_reason), (bar, bar_reason), prompt_cfg


def _gate(context, config, model, ray, store, candidates, round_dataset, bar, heldout, signals) -> tuple:
    """``core.gate.gate_round`` with the round's base model, checkpoint and (judge mode) self-judge."""
    key = context.partition_key
    ckpt = store.checkpoint_dir(key)
    require_checkpoint(ckpt, key, fingerprint(round_dataset))
    mode = signals["quality_signals"]["quality_mode"][0]
    judge_lm = model.load(str(ckpt)) if mode in ("judge", "combined") else None
    return gate_round(
        candidates,
        **signals,
        base=lambda: ray.forward(model, log=context.log.info),
        checkpoint=lambda: ray.forward(model, str(ckpt), log=context.log.info),
        judge_model=judge_lm,
        rules=config.gate_rules(bar),
        round_dataset=round_dataset,
        heldout_grams=heldout_grams(heldout, config.gate.heldout_ngram),
        ngram=config.gate.heldout_ngram,
        log=context.log.warning,
        progress=lambda name: ProgressLogger(context.log.info, name),
    )


def _stages(verified: pl.DataFrame) -> dict:
    """``gate.stage_counts``, named for the UI."""
    names = {"text": "text rules (no forward pass)", "base": "base-model readings (no checkpoint pass)"}
    return {names.get(k, "read in full"): n for k, n in stage_counts(verified).items()}


def _candidates_metadata(config: RefineConfig, verified: pl.DataFrame, th, seconds: dict) -> dict:
    """refinement_candidates' metadata: how many passed, why the others were rejected, the thresholds."""
    by_reason = [(f"{o}: {r}", n) for o, r, n in rejections_by_reason(verified).iter_rows()]
    return tidy(
        {
            "candidates": verified.height,
            "generated": int((verified["status"] == "ok").sum()) if verified.height else 0,
            "passed": int(verified["passed"].sum()) if verified.height else 0,
            "per_sample": config.candidates,
            "temperature": config.temperature,
            "rejected_by_reason": json_md(dict(by_reason)),
            "thresholds": json_md(th.as_dict() if th else {}),
            **seconds,
            "settled_by_stage": json_md(_stages(verified)),
            "why_rejected": bars_md(sorted(by_reason, key=lambda x: -x[1]), "rejected candidates by reason"),
        },
        first=("passed", "candidates", "why_rejected"),
    )


def _refined_metadata(
    config: RefineConfig, optimizer: OptimizerResource, chosen: pl.DataFrame, run: dict, seconds: dict, gen_s: float
) -> dict:
    """refined_samples' metadata: outcomes by operation, why the rest failed, how the optimizer ran."""
    plan: RefinementPlan = run["plan"]
    verdict: RollbackVerdict = run["verdict"]
    (style, style_reason), (bar, bar_reason) = run["style"], run["bar"]
    by_status = {code: chosen.filter(pl.col("status") == code) for code in ("ok", "rejected", "failed")}
    outcomes = outcomes_by_operation(chosen)
    bars = [(f"{op}: {name}", n) for op, counts in outcomes.items() for name, n in counts.items() if n]
    rejected_columns = ["operation", "failure_reason", "instruction_before", "instruction_after", "output_after"]
    return tidy(
        {
            "attempted": chosen.height,
            "skipped_for_rollback": run["skipped"],
            **({"rollback_expected": verdict.reason} if verdict.rollback else {}),
            "accepted": by_status["ok"].height,
            "rejected": by_status["rejected"].height,
            "failed": by_status["failed"].height,
            "succeeded": by_status["ok"].height,  # kept for earlier dashboards: = accepted
            "by_operation": json_md(outcomes),
            "rejected_or_failed_by_reason": json_md(failure_counts(chosen)),
            "hard_and_low_quality": MetadataValue.text(
                f"{plan.hard_and_low_quality} samples flagged hard and low quality: rewritten, not simplified (a "
                "sample the model cannot learn and whose prompt does not explain its answer is more likely defective "
                "than difficult)"
            ),
            "sparse_not_extended": MetadataValue.text(
                f"{plan.sparse_not_extended} sparse samples are also low quality: not extended (an extension would "
                "carry the defect)"
            ),
            "cache": json_md(run["stats"]),
            "prompt_style": style,
            "prompt_style_reason": style_reason,
            "optimizer": f"{optimizer.backend}:{optimizer.model}",
            "acceptance_bar": bar,
            "acceptance_bar_reason": bar_reason,
            "generation_seconds": seconds["generation_seconds"],
            **_generation_rate(run["stats"], gen_s),
            "verification_seconds": seconds["verification_seconds"],
            "accepted_before_after": preview_md(by_status["ok"], SIGNAL_COLUMNS, n=10),
            "rejected_examples": preview_md(by_status["rejected"], rejected_columns, n=10),
            "failed_examples": preview_md(
                by_status["failed"], ["operation", "origin_id", "failure_reason", "instruction_before"], n=5
            ),
            "outcome": bars_md(bars, "refinements by operation and outcome"),
        },
        first=("accepted", "rejected", "failed", "attempted", "outcome", "accepted_before_after"),
    )


def _generation_rate(stats: dict, seconds: float) -> dict:
    """Completion tokens the optimizer generated in this step (cache hits excluded) and their rate
    over the step's generation seconds; empty when the backend does not count tokens."""
    tokens = stats.get("generated_tokens")
    if tokens is None:
        return {}
    out = {"generated_tokens": int(tokens)}
    if tokens and seconds > 0:
        out["generation_tokens_per_s"] = round(tokens / seconds, 1)
    return out


def optimizer_calls_check(candidates: pl.DataFrame, style: str) -> AssetCheckResult:
    """Failed when operations were planned and not one optimizer candidate came out usable (every
    call failed or could not be parsed): a broken backend, or a prompt style the model cannot
    follow; the round's data then stays unchanged, and that must not pass unnoticed."""
    n_generated = int((candidates["status"] == "ok").sum()) if candidates.height else 0
    all_failed = candidates.height > 0 and n_generated == 0
    reasons = failure_counts(candidates, sort_by_count=True)
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
