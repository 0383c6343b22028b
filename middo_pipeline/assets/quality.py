"""Step 2b of the loop: the quality signal, one value per sample (IFD under the base model, the
checkpoint judging itself, or both)."""

import time
from typing import Literal

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, Output, asset
from pydantic import Field

from middo_pipeline.assets._checks import band_check, band_spec
from middo_pipeline.assets._meta import image_md, preview_md, tidy
from middo_pipeline.assets.signals import ThresholdConfig, _prompts_responses
from middo_pipeline.constants import JUDGE_MAX_LENGTH
from middo_pipeline.core import quality
from middo_pipeline.core.checkpoints import require_checkpoint
from middo_pipeline.core.ifd import ifd_scores
from middo_pipeline.core.llm import make_backend
from middo_pipeline.core.plots import histogram_png
from middo_pipeline.core.progress import ProgressLogger
from middo_pipeline.core.schema import fingerprint
from middo_pipeline.core.thresholds import flag_below
from middo_pipeline.core.verify import QualityScale, quality_value
from middo_pipeline.resources import ModelResource, OptimizerResource, RayComputeResource, StorageResource
from middo_pipeline.rounds import round_number, rounds_partitions

TITLES = {"judge": "self-judged quality", "ifd": "instruction-following difficulty", "combined": "quality (combined)"}


class QualitySignalConfig(ThresholdConfig):
    mode: Literal["judge", "ifd", "combined"] = Field(
        default="ifd",
        description="ifd: instruction-following difficulty under the base model (response loss with ÷ without the "
        "prompt; works with small models); judge: the self-judge's 0-10 score (the paper; needs a "
        "capable model); combined: the mean of both, standardised",
    )
    judge_reading: Literal["expected", "generate"] = Field(
        default="expected",
        description="judge: expected = score from next-token probabilities (one packed pass); "
        "generate = the judge writes a number that is parsed",
    )
    judge: Literal["self", "optimizer"] = Field(
        default="self",
        description="self: this round's checkpoint judges (the paper); optimizer: the optimizer LLM "
        "judges (generate reading; use a strong model to catch wrong facts)",
    )
    max_length: int = Field(
        default=JUDGE_MAX_LENGTH,
        description="Tokens per judge prompt: the sample inside the rubric's framing, so longer than a sample's",
    )
    max_batch_size: int = Field(default=16)


def _judge(
    context,
    config: QualitySignalConfig,
    model: ModelResource,
    optimizer: OptimizerResource,
    ray: RayComputeResource,
    store,
    prompts,
    responses,
) -> tuple[np.ndarray, dict]:
    """The 6 judgements per sample, (N, 6), and which path ran."""
    progress = ProgressLogger(context.log.info, "quality judgements", unit="judgements")
    info: dict = {"judge_path": f"generate ({config.judge})"}
    if config.judge == "optimizer":
        return quality.generated_scores(optimizer.make_backend(store), prompts, responses, progress=progress), info
    ckpt = str(store.checkpoint_dir(context.partition_key))
    if config.judge_reading == "generate":
        lm = model.load(ckpt)
        return quality.generated_scores(make_backend("local", loaded=lm), prompts, responses, progress=progress), info
    with ray.forward(model, ckpt, log=context.log.info) as judge:  # this process, or Ray workers
        scores6 = judge.expected_scores(
            prompts,
            responses,
            max_length=config.max_length,
            max_batch_size=config.max_batch_size,
            progress=progress,
            info=info,
        )
    if info["judge_path"] != "packed":
        context.log.warning(
            f"self-judge fell back to one forward pass per judgement (about 5x slower): {info['fallback_reason']}"
        )
    return scores6, info


@asset(
    check_specs=[band_spec("quality_signals")],
    partitions_def=rounds_partitions,
    group_name="signals",
    kinds={"pytorch", "polars"},
    deps=["sft_checkpoint"],
    description=(
        "Quality signal, one value per sample (higher is better), low quality below mean − m·std. mode ifd (default): "
        "minus the instruction-following difficulty (the prompt should explain the response); judge: the checkpoint "
        "judges factuality, clarity and completeness 0-10 (6 judgements; missing, never 0); combined: both."
    ),
)
def quality_signals(
    context: AssetExecutionContext,
    config: QualitySignalConfig,
    model: ModelResource,
    optimizer: OptimizerResource,
    storage: StorageResource,
    ray: RayComputeResource,
    round_dataset: pl.DataFrame,
    model_readouts: pl.DataFrame,
):
    r = round_number(context.partition_key)
    store = storage.get()
    if model_readouts["sample_id"].to_list() != round_dataset["sample_id"].to_list():
        raise ValueError(
            f"{context.partition_key}: model_readouts does not describe this round_dataset: "
            "re-materialize model_readouts"
        )
    prompts, responses = _prompts_responses(round_dataset)
    n = round_dataset.height
    t0 = time.perf_counter()
    ifd = ifd_scores(model_readouts["loss_before"].to_numpy(), model_readouts["loss_unconditional"].to_numpy())
    scores6, judge_info = np.full((n, 6), np.nan), {"judge_path": "not run (mode ifd)"}
    if config.mode in ("judge", "combined"):
        require_checkpoint(
            store.checkpoint_dir(context.partition_key), context.partition_key, fingerprint(round_dataset)
        )
        scores6, judge_info = _judge(context, config, model, optimizer, ray, store, prompts, responses)
    combined = quality.combine_scores(scores6)
    judge_score = np.asarray(combined["quality_score"], dtype=np.float64)
    scale = QualityScale.fit(config.mode, judge_score, ifd)
    value = quality_value(scale, judge_score, ifd)
    res = flag_below(value, config.spec(), r)
    df = _table(round_dataset["sample_id"], scores6, combined, ifd, value, res, scale, config.mode)
    seconds = round(time.perf_counter() - t0, 1)
    md = _metadata(
        context.partition_key, config, df, round_dataset, scores6, combined, ifd, value, judge_info, res, seconds
    )
    yield Output(df, metadata=md)
    yield band_check(int(res.n_flagged), df.height, "quality_signals")


def _table(sample_ids, scores6, combined, ifd, value, res, scale, mode: str) -> pl.DataFrame:
    """quality_signals' table: the judgements, the IFD, the quality value and the flag, with how
    the value was made and where the line is (verified refinement measures candidates the same way)."""
    cols = {"sample_id": sample_ids}
    for j, dim in enumerate(quality.DIMENSIONS):
        cols[f"{dim}_prompt"] = scores6[:, j].astype(np.float32)
        cols[f"{dim}_full"] = scores6[:, 3 + j].astype(np.float32)
    for dim in quality.DIMENSIONS:
        cols[dim] = np.asarray(combined[dim], dtype=np.float32)
    cols["quality_score"] = np.asarray(combined["quality_score"], dtype=np.float32)  # NaN when the judge did not run
    cols["n_missing"] = np.asarray(combined["n_missing"], dtype=np.int64)
    cols["ifd"] = ifd
    cols["quality_value"] = value
    cols["is_low_quality"] = res.flagged
    return pl.DataFrame(cols).with_columns(
        pl.col("ifd", "quality_value").fill_nan(None),
        pl.lit(mode).alias("quality_mode"),
        pl.lit(float(res.threshold), dtype=pl.Float64).alias("quality_threshold"),
        *[pl.lit(v, dtype=pl.Float64).alias(k) for k, v in scale.as_dict().items() if k != "mode"],
    )


def _metadata(key, config, df, round_dataset, scores6, combined, ifd, value, judge_info, res, seconds) -> dict:
    """quality_signals' metadata: how many are low quality, the judge's path, histograms, the lowest."""
    judge_score = np.asarray(combined["quality_score"], dtype=np.float64)
    lowest = df.join(round_dataset.select("sample_id", "instruction", "output"), on="sample_id").sort(
        "quality_value", nulls_last=True
    )
    hist = (
        {"quality_value": value}
        | ({"ifd": ifd} if config.mode != "judge" else {})
        | ({d: np.asarray(combined[d]) for d in quality.DIMENSIONS} if config.mode != "ifd" else {})
    )
    return tidy(
        {
            **res.as_metadata(),
            "mode": config.mode,
            **(
                {
                    "judge": config.judge,
                    "judge_reading": config.judge_reading,
                    "missing_judgements": int(np.isnan(scores6).sum()),
                    "judge_mean": round(float(np.nanmean(judge_score)), 3) if np.isfinite(judge_score).any() else None,
                }
                if config.mode != "ifd"
                else {}
            ),
            "judge_path": judge_info["judge_path"],
            **(
                {"judge_fallback_reason": str(judge_info["fallback_reason"])}
                if judge_info.get("fallback_reason") and judge_info["judge_path"] != "packed"
                else {}
            ),
            "seconds": seconds,
            "low_quality": int(res.n_flagged),
            "low_quality_fraction": float(res.fraction),
            "ifd_mean": round(float(np.nanmean(ifd)), 4) if np.isfinite(ifd).any() else None,
            "missing_values": int((~np.isfinite(value)).sum()),
            "histograms": image_md(
                histogram_png(
                    {k: v for k, v in hist.items() if v is not None},
                    {"quality_value": float(res.threshold)},
                    f"{key}: {TITLES[config.mode]}",
                ),
                "quality histograms",
            ),
            "lowest_scored": preview_md(
                lowest, ["sample_id", "quality_value", "ifd", "quality_score", "instruction", "output"]
            ),
        },
        first=("low_quality", "low_quality_fraction", "mode", "m", "threshold", "histograms"),
    )
