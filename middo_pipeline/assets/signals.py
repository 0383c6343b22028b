"""Step 2 of the loop: the three self-referential signals, read off this round's checkpoint."""

import json
import time
from typing import Literal

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field, field_validator

from middo_pipeline.assets._checks import band_check, band_spec
from middo_pipeline.assets._meta import image_md, json_md, preview_md, tidy
from middo_pipeline.constants import JUDGE_MAX_LENGTH, MAX_LENGTH
from middo_pipeline.core import diversity, quality, readout_cache
from middo_pipeline.core.checkpoints import derived_key, find_derived, require_checkpoint, source_digest
from middo_pipeline.core.forward import EmbeddingSpec
from middo_pipeline.core.ifd import ifd_scores
from middo_pipeline.core.llm import make_backend
from middo_pipeline.core.plots import cluster_map_png, histogram_png, loss_scatter_png
from middo_pipeline.core.progress import ProgressLogger
from middo_pipeline.core.schema import fingerprint, prompt_text
from middo_pipeline.core.thresholds import ThresholdSpec, flag_below, flag_both_above
from middo_pipeline.core.verify import QualityScale, quality_value
from middo_pipeline.models.loading import pick_device
from middo_pipeline.resources import ModelResource, OptimizerResource, RayComputeResource, StorageResource
from middo_pipeline.rounds import earlier_rounds, previous_table, round_number, rounds_partitions


class ThresholdConfig(Config):
    m: list[float] = Field(
        default=[1.0], description="mean ± m·std; a list is a per-round schedule (last value repeats)"
    )
    decay: float | None = Field(
        default=None, description="Multiply m by decay**(round-1): selection tightens as the model improves"
    )
    target_fraction: float | None = Field(default=None, description="Flag this fraction instead of using m")

    def spec(self) -> ThresholdSpec:
        if self.target_fraction is not None:
            return ThresholdSpec(m=None, target_fraction=self.target_fraction)
        return ThresholdSpec(m=list(self.m), decay=self.decay)


def _prompts_responses(df: pl.DataFrame) -> tuple[list[str], list[str]]:
    prompts = [prompt_text(i, x) for i, x in zip(df["instruction"].to_list(), df["input"].to_list())]
    return prompts, df["output"].to_list()


# --------------------------------------------------------------------------------------
class ReadoutConfig(Config):
    max_length: int = Field(
        default=MAX_LENGTH, description="Tokens per sample; longer samples are truncated (response first)"
    )
    max_batch_tokens: int = Field(default=8192, description="Token budget of one length-bucketed batch")
    reuse_base_readouts: bool = Field(
        default=True,
        description="Keep the base model's per-sample readouts (loss before training, prompt-free loss) across rounds "
        "and score only the samples not seen before (they depend on the base model, the text and max_length only)",
    )
    embedding_pooling: Literal["mean", "last"] = Field(
        default="mean",
        description="Prompt embedding: mean over the prompt tokens (default, chosen on the controlled benchmark), or the "
        "last prompt token's state",
    )
    embedding_layer: str = Field(
        default="last",
        description="Hidden states for the embedding: last (after the final norm), middle, or a layer number",
    )

    def embedding_spec(self) -> EmbeddingSpec:
        return EmbeddingSpec(pooling=self.embedding_pooling, layer=self.embedding_layer)

    @field_validator("embedding_layer")
    @classmethod
    def _known_layer(cls, v: str) -> str:
        EmbeddingSpec(layer=v)  # raises with the allowed values
        return v


# beside each round's readouts table: the key it was computed under (core.checkpoints.derived_key)
READOUTS_RECORD = "reuse.json"


@asset(
    partitions_def=rounds_partitions,
    group_name="signals",
    kinds={"pytorch", "polars"},
    deps=["sft_checkpoint"],
    description=(
        "Batched, length-bucketed forward passes over the round's samples: under the base model, the response loss "
        "with and without the prompt (loss before training; instruction-following difficulty); under this round's "
        "checkpoint, the response loss after training and the prompt embedding (same pass)."
    ),
)
def model_readouts(
    context: AssetExecutionContext,
    config: ReadoutConfig,
    model: ModelResource,
    storage: StorageResource,
    ray: RayComputeResource,
    round_dataset: pl.DataFrame,
) -> pl.DataFrame:
    store = storage.get()
    ckpt = store.checkpoint_dir(context.partition_key)
    require_checkpoint(ckpt, context.partition_key, fingerprint(round_dataset))
    spec = config.embedding_spec()
    record = store.ensure_dir(store.artifact_dir("model_readouts", context.partition_key)) / READOUTS_RECORD
    record.unlink(missing_ok=True)  # written again once this materialization's table is known
    # the same weights on the same rows with the same settings read the same values: a round
    # whose checkpoint is an earlier round's (sft_checkpoint reuse_identical) on unchanged data
    # reads that round's table
    reuse_key = derived_key(
        ckpt,
        asset="model_readouts",
        rows=fingerprint(round_dataset),
        max_length=config.max_length,
        max_batch_tokens=config.max_batch_tokens,
        embedding=[spec.pooling, str(spec.layer)],
        load=model.load_kwargs(),
        code=source_digest("core/forward.py", "core/ifd.py", "core/readout_cache.py", "models/loading.py"),
    )
    same = find_derived(
        (
            (q, store.artifact_dir("model_readouts", q) / READOUTS_RECORD, store.table_path("model_readouts", q))
            for q in reversed(earlier_rounds(context.partition_key))
        ),
        reuse_key,
    )
    if same is not None:
        reused = pl.read_parquet(same[1])
        if reused["sample_id"].to_list() == round_dataset["sample_id"].to_list():
            context.log.info(
                f"{context.partition_key}'s checkpoint and rows are {same[0]}'s (same training key, same rows in the "
                "same order, same settings): its readouts are read, not recomputed"
            )
            record.write_text(json.dumps({"reuse_key": reuse_key, "reused_from": same[0]}))
            context.add_output_metadata(
                tidy(
                    {
                        "samples": reused.height,
                        "reused_from": same[0],
                        "model_before": model.base_model,
                        "checkpoint": MetadataValue.path(str(ckpt)),
                        "embedding": f"{spec.pooling} pooling, layer {spec.layer}",
                        "embedding_dim": len(reused["embedding"][0]) if reused.height else 0,
                        "base_readouts_reused": reused.height,
                    }
                )
            )
            return reused
    prompts, responses = _prompts_responses(round_dataset)
    kw = dict(max_length=config.max_length, max_batch_tokens=config.max_batch_tokens)
    # "before training" is always the base model, whatever the training init: a previous
    # round's checkpoint has already seen the kept samples, so new samples would look hard
    t0 = time.perf_counter()
    keys = readout_cache.row_keys(prompts, responses, config.max_length)
    cache = None
    hits: dict = {}
    if config.reuse_base_readouts:
        identity = readout_cache.model_identity(model.base_model, model.base_path(), model.load_kwargs())
        cache = readout_cache.BaseReadoutCache(store.cache_dir / "base_readouts", identity)
        hits = cache.lookup(keys)
    _, missing = readout_cache.split_hits(keys, hits)
    base_tokens = 0
    computed: dict = {}  # the missing rows' values (none when every row was cached)
    if missing:
        if hits:
            context.log.info(
                f"base model readouts: {len(keys) - len(missing)} of {len(keys)} samples kept from earlier rounds, "
                f"scoring {len(missing)}"
            )
        mp, mr = [prompts[i] for i in missing], [responses[i] for i in missing]
        with ray.forward(model, log=context.log.info) as base:
            before = base.score_samples(
                mp,
                mr,
                with_embeddings=False,
                progress=ProgressLogger(context.log.info, "loss before training (base model)"),
                **kw,
            )
            uncond = base.unconditional_loss(
                mr, progress=ProgressLogger(context.log.info, "prompt-free loss (base model)"), **kw
            )
        base_tokens = before.n_tokens + uncond.n_tokens
        computed = {"loss_before": before.loss, "loss_unconditional": uncond.loss}
    else:
        context.log.info(f"base model readouts: all {len(keys)} samples kept from earlier rounds")
    base_values, new_rows = readout_cache.assemble(keys, hits, missing, computed)
    if cache is not None:
        cache.add(new_rows)
    with ray.forward(model, str(ckpt), log=context.log.info) as trained:
        after = trained.score_samples(
            prompts,
            responses,
            with_embeddings=True,
            embedding=spec,
            progress=ProgressLogger(context.log.info, "loss + embedding after training"),
            **kw,
        )
        workers = trained.workers
    seconds = time.perf_counter() - t0
    total_tokens = base_tokens + after.n_tokens
    df = pl.DataFrame(
        {
            "sample_id": round_dataset["sample_id"],
            "loss_before": base_values["loss_before"],
            "loss_after": after.loss.astype(np.float32),
            "loss_unconditional": base_values["loss_unconditional"],
            "n_response_tokens": np.asarray(after.n_response_tokens, dtype=np.int64),
            "embedding": after.embedding.astype(np.float32),
        }
    ).with_columns(pl.lit(spec.pooling).alias("embedding_pooling"), pl.lit(str(spec.layer)).alias("embedding_layer"))
    context.add_output_metadata(
        tidy(
            {
                "samples": df.height,
                "model_before": model.base_model,
                "checkpoint": MetadataValue.path(str(ckpt)),
                "embedding": f"{spec.pooling} pooling, layer {spec.layer}",
                "embedding_dim": int(after.embedding.shape[1]),
                "compute": f"ray: {workers} workers at {ray.address}" if ray.enabled else "this process",
                "base_readouts_reused": len(keys) - len(missing),
                "tokens": int(total_tokens),
                "seconds": round(seconds, 1),
                "tokens_per_second": round(total_tokens / max(seconds, 1e-9), 1),
            }
        )
    )
    record.write_text(json.dumps({"reuse_key": reuse_key}))
    return df


# --------------------------------------------------------------------------------------
class LossSignalConfig(ThresholdConfig):
    pass


@asset(
    check_specs=[band_spec("loss_signals")],
    partitions_def=rounds_partitions,
    group_name="signals",
    kinds={"polars"},
    description="Complexity signal: a sample is hard when its response loss exceeds mean + m·std both before and after training.",
)
def loss_signals(
    context: AssetExecutionContext, config: LossSignalConfig, model_readouts: pl.DataFrame, round_dataset: pl.DataFrame
):
    r = round_number(context.partition_key)
    before = model_readouts["loss_before"].to_numpy().astype(np.float64)
    after = model_readouts["loss_after"].to_numpy().astype(np.float64)
    res_before, res_after, hard = flag_both_above(before, after, config.spec(), r)
    df = model_readouts.select("sample_id", "loss_before", "loss_after", "n_response_tokens").with_columns(
        pl.Series("is_hard", hard),
        # the thresholds travel with the table: verified refinement compares candidates with them
        pl.lit(float(res_before.threshold), dtype=pl.Float64).alias("threshold_loss_before"),
        pl.lit(float(res_after.threshold), dtype=pl.Float64).alias("threshold_loss_after"),
    )
    hardest = df.join(round_dataset.select("sample_id", "instruction", "output"), on="sample_id").sort(
        "loss_after", descending=True, nulls_last=True
    )
    yield Output(
        df,
        metadata=tidy(
            {
                "m": res_after.m if res_after.m is not None else MetadataValue.text("target fraction"),
                "threshold_loss_before": float(res_before.threshold),
                "threshold_loss_after": float(res_after.threshold),
                "hard": int(hard.sum()),
                "hard_fraction": float(hard.mean()) if len(hard) else 0.0,
                "loss_before_mean": float(np.nanmean(before)),
                "loss_after_mean": float(np.nanmean(after)),
                "missing": int(np.isnan(after).sum()),
                "scatter": image_md(
                    loss_scatter_png(before, after, hard, res_before.threshold, res_after.threshold),
                    "loss before vs after training",
                ),
                "hardest": preview_md(
                    hardest, ["sample_id", "loss_before", "loss_after", "is_hard", "instruction", "output"]
                ),
            },
            first=("hard", "hard_fraction", "m", "threshold_loss_after", "scatter"),
        ),
    )
    yield band_check(int(hard.sum()), len(hard), "loss_signals")


# --------------------------------------------------------------------------------------
class EmbeddingSignalConfig(ThresholdConfig):
    k: int = Field(default=2, description="Neighbours per sample (itself excluded)")
    knn_method: diversity.KnnMethod = Field(
        default="auto",
        description="Top-k neighbour search: exact (blockwise all-pairs), approx (faiss IVF; for very large N), "
        "or auto (exact up to 200k samples, approx above)",
    )
    knn_nprobe: int | None = Field(
        default=None, description="approx only: IVF lists searched per query (default 16; more = higher recall, slower)"
    )
    top_components: int = Field(
        default=1,
        ge=0,
        description="Remove this many top principal directions of the round's embeddings before the "
        "neighbour search (0: none); they make every cosine similarity high",
    )
    n_clusters: int | None = Field(default=None, description="k-means clusters (default: about sqrt(N/2), 2..50)")
    umap: bool = Field(default=True, description="Draw the UMAP cluster map (numba compiles for ~15 s per process)")
    seed: int = Field(default=0)


@asset(
    check_specs=[band_spec("embedding_signals")],
    partitions_def=rounds_partitions,
    group_name="signals",
    kinds={"polars", "sklearn"},
    description=(
        "Diversity signal: mean cosine similarity to the top-k neighbours (blockwise, never N×N); a sample is sparse "
        "below mean − m·std. Also k-means clusters, their change since the previous round, and a UMAP map."
    ),
)
def embedding_signals(
    context: AssetExecutionContext,
    config: EmbeddingSignalConfig,
    storage: StorageResource,
    model: ModelResource,
    model_readouts: pl.DataFrame,
):
    r = round_number(context.partition_key)
    ids = model_readouts["sample_id"].to_list()
    emb = np.asarray(model_readouts["embedding"].to_list(), dtype=np.float32)
    emb = diversity.TopComponents(config.top_components).fit(emb).transform(emb)
    # the exact search runs where the model runs (a GPU when there is one)
    sims, idx, knn_info = diversity.topk_cosine(
        emb,
        k=config.k,
        method=config.knn_method,
        nprobe=config.knn_nprobe,
        device=pick_device(model.device),
        return_info=True,
    )
    score = diversity.sparsity_scores(sims)
    res = flag_below(score.astype(np.float64), config.spec(), r)
    labels = diversity.kmeans_clusters(emb, n_clusters=config.n_clusters, seed=config.seed)

    dynamics: dict = {}
    prev_path = previous_table(storage.get(), "embedding_signals", context.partition_key)
    if prev_path is not None and prev_path.exists():
        prev = pl.read_parquet(prev_path, columns=["sample_id", "cluster"])
        dynamics = diversity.cluster_dynamics(prev["sample_id"].to_list(), prev["cluster"].to_numpy(), ids, labels)
    if config.umap:
        xy, method = diversity.umap_2d(emb, seed=config.seed)
    else:
        xy, method = np.zeros((len(ids), 2), dtype=np.float32), "none"
    neighbor_ids = [[ids[j] for j in row] for row in idx.tolist()]
    df = pl.DataFrame(
        {
            "sample_id": ids,
            "knn_mean_similarity": score.astype(np.float32),
            "neighbor_ids": neighbor_ids,
            "neighbor_similarities": sims.astype(np.float32),
            "cluster": labels.astype(np.int64),
            "map_x": xy[:, 0].astype(np.float32),
            "map_y": xy[:, 1].astype(np.float32),
            "is_sparse": res.flagged,
        }
    ).with_columns(
        pl.lit(config.top_components, dtype=pl.Int64).alias("top_components"),
        pl.lit(float(res.threshold), dtype=pl.Float64).alias("threshold_similarity"),
    )
    sizes = np.bincount(labels).tolist()
    meta = {
        **{f"{k}": v for k, v in res.as_metadata().items()},
        "k": config.k,
        "top_components_removed": config.top_components,
        "knn_method": knn_info["method"],
        "sparse": int(res.n_flagged),
        "sparse_fraction": float(res.fraction),
        "clusters": len(sizes),
        "cluster_sizes": json_md(sizes),
        "map_method": method,
        "sparsest": preview_md(
            df.sort("knn_mean_similarity"), ["sample_id", "knn_mean_similarity", "cluster", "neighbor_ids"]
        ),
    }
    for key, value in dynamics.items():
        if isinstance(value, (int, float)):
            meta[f"dynamics_{key}"] = float(value)
    if config.umap:
        meta["cluster_map"] = image_md(
            cluster_map_png(xy, labels, res.flagged, f"{context.partition_key}: clusters, sparse marked"), "cluster map"
        )
    first = ("sparse", "sparse_fraction", "m", "threshold", "cluster_map")
    yield Output(df, metadata=tidy(meta, first=first))
    yield band_check(int(res.n_flagged), len(ids), "embedding_signals")


# --------------------------------------------------------------------------------------
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
    cols = {"sample_id": round_dataset["sample_id"]}
    for j, dim in enumerate(quality.DIMENSIONS):
        cols[f"{dim}_prompt"] = scores6[:, j].astype(np.float32)
        cols[f"{dim}_full"] = scores6[:, 3 + j].astype(np.float32)
    for dim in quality.DIMENSIONS:
        cols[dim] = np.asarray(combined[dim], dtype=np.float32)
    cols["quality_score"] = judge_score.astype(np.float32)  # the self-judge's 0-10 (NaN when it did not run)
    cols["n_missing"] = np.asarray(combined["n_missing"], dtype=np.int64)
    cols["ifd"] = ifd
    cols["quality_value"] = value
    cols["is_low_quality"] = res.flagged
    df = pl.DataFrame(cols).with_columns(
        pl.col("ifd", "quality_value").fill_nan(None),
        # how the value was made and where the line is: verified refinement measures candidates the same way
        pl.lit(config.mode).alias("quality_mode"),
        pl.lit(float(res.threshold), dtype=pl.Float64).alias("quality_threshold"),
        *[pl.lit(v, dtype=pl.Float64).alias(k) for k, v in scale.as_dict().items() if k != "mode"],
    )
    lowest = df.join(round_dataset.select("sample_id", "instruction", "output"), on="sample_id").sort(
        "quality_value", nulls_last=True
    )
    title = {
        "judge": "self-judged quality",
        "ifd": "instruction-following difficulty",
        "combined": "quality (combined)",
    }
    hist = (
        {"quality_value": value}
        | ({"ifd": ifd} if config.mode != "judge" else {})
        | ({d: np.asarray(combined[d]) for d in quality.DIMENSIONS} if config.mode != "ifd" else {})
    )
    yield Output(
        df,
        metadata=tidy(
            {
                **res.as_metadata(),
                "mode": config.mode,
                **(
                    {
                        "judge": config.judge,
                        "judge_reading": config.judge_reading,
                        "missing_judgements": int(np.isnan(scores6).sum()),
                        "judge_mean": round(float(np.nanmean(judge_score)), 3)
                        if np.isfinite(judge_score).any()
                        else None,
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
                "seconds": round(time.perf_counter() - t0, 1),
                "low_quality": int(res.n_flagged),
                "low_quality_fraction": float(res.fraction),
                "ifd_mean": round(float(np.nanmean(ifd)), 4) if np.isfinite(ifd).any() else None,
                "missing_values": int((~np.isfinite(value)).sum()),
                "histograms": image_md(
                    histogram_png(
                        {k: v for k, v in hist.items() if v is not None},
                        {"quality_value": float(res.threshold)},
                        f"{context.partition_key}: {title[config.mode]}",
                    ),
                    "quality histograms",
                ),
                "lowest_scored": preview_md(
                    lowest, ["sample_id", "quality_value", "ifd", "quality_score", "instruction", "output"]
                ),
            },
            first=("low_quality", "low_quality_fraction", "mode", "m", "threshold", "histograms"),
        ),
    )
    yield band_check(int(res.n_flagged), df.height, "quality_signals")
