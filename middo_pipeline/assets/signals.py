"""Step 2 of the loop: the three self-referential signals, read off this round's checkpoint."""


import time
from typing import Literal

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field

from middo_pipeline.assets._checks import band_check, band_spec
from middo_pipeline.assets._meta import image_md, json_md, preview_md
from middo_pipeline.core import diversity, quality
from middo_pipeline.core.forward import score_samples
from middo_pipeline.core.llm import make_backend
from middo_pipeline.core.plots import cluster_map_png, histogram_png, loss_scatter_png
from middo_pipeline.core.progress import ProgressLogger
from middo_pipeline.core.schema import prompt_text
from middo_pipeline.core.thresholds import ThresholdSpec, flag_below, flag_both_above
from middo_pipeline.models.loading import pick_device
from middo_pipeline.resources import ModelResource, OptimizerResource, StorageResource
from middo_pipeline.rounds import previous_table, round_number, rounds_partitions, trained_from


class ThresholdConfig(Config):
    m: list[float] = Field(default=[1.0], description="mean ± m·std; a list is a per-round schedule (last value repeats)")
    decay: float | None = Field(default=None, description="Multiply m by decay**(round-1): selection tightens as the model improves")
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
    max_length: int = Field(default=384, description="Tokens per sample; longer samples are truncated (response first)")
    max_batch_tokens: int = Field(default=8192, description="Token budget of one length-bucketed batch")


@asset(
    partitions_def=rounds_partitions,
    group_name="signals",
    kinds={"pytorch", "polars"},
    deps=["sft_checkpoint"],
    description=(
        "One batched, length-bucketed forward pass per model over the round's samples: response loss under the model "
        "before training and under this round's checkpoint, and the checkpoint's mean-pooled prompt embedding "
        "(from the same pass as its loss)."
    ),
)
def model_readouts(
    context: AssetExecutionContext,
    config: ReadoutConfig,
    model: ModelResource,
    storage: StorageResource,
    round_dataset: pl.DataFrame,
) -> pl.DataFrame:
    store = storage.get()
    ckpt = store.checkpoint_dir(context.partition_key)
    if not store.checkpoint_ready(context.partition_key):
        raise FileNotFoundError(f"no sft_checkpoint for {context.partition_key} at {ckpt}: materialize sft_checkpoint first")
    prompts, responses = _prompts_responses(round_dataset)
    # "before training" = what this round's training started from: the base model, or the
    # previous round's checkpoint when training continues across rounds
    before_path = trained_from(ckpt)

    lm = model.load(before_path)
    before = score_samples(lm.model, lm.tokenizer, prompts, responses, max_length=config.max_length,
                           max_batch_tokens=config.max_batch_tokens, with_embeddings=False,
                           progress=ProgressLogger(context.log.info, "loss before training"))
    del lm
    lm = model.load(str(ckpt))
    after = score_samples(lm.model, lm.tokenizer, prompts, responses, max_length=config.max_length,
                          max_batch_tokens=config.max_batch_tokens, with_embeddings=True,
                          progress=ProgressLogger(context.log.info, "loss + embedding after training"))
    total_tokens = before.n_tokens + after.n_tokens
    seconds = before.seconds + after.seconds
    df = pl.DataFrame(
        {
            "sample_id": round_dataset["sample_id"],
            "loss_before": before.loss.astype(np.float32),
            "loss_after": after.loss.astype(np.float32),
            "n_response_tokens": np.asarray(after.n_response_tokens, dtype=np.int64),
            "embedding": after.embedding.astype(np.float32),
        }
    )
    context.add_output_metadata(
        {
            "samples": df.height,
            "model_before": before_path or model.base_model,
            "checkpoint": MetadataValue.path(str(ckpt)),
            "embedding_dim": int(after.embedding.shape[1]),
            "tokens": int(total_tokens),
            "seconds": round(seconds, 2),
            "samples_per_second": round(2 * df.height / max(seconds, 1e-9), 2),
            "tokens_per_second": round(total_tokens / max(seconds, 1e-9), 1),
        }
    )
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
def loss_signals(context: AssetExecutionContext, config: LossSignalConfig, model_readouts: pl.DataFrame,
                 round_dataset: pl.DataFrame):
    r = round_number(context.partition_key)
    before = model_readouts["loss_before"].to_numpy().astype(np.float64)
    after = model_readouts["loss_after"].to_numpy().astype(np.float64)
    res_before, res_after, hard = flag_both_above(before, after, config.spec(), r)
    df = model_readouts.select("sample_id", "loss_before", "loss_after", "n_response_tokens").with_columns(
        pl.Series("is_hard", hard)
    )
    hardest = (
        df.join(round_dataset.select("sample_id", "instruction", "output"), on="sample_id")
        .sort("loss_after", descending=True, nulls_last=True)
    )
    yield Output(df, metadata=
        {
            "m": res_after.m if res_after.m is not None else MetadataValue.text("target fraction"),
            "threshold_loss_before": float(res_before.threshold),
            "threshold_loss_after": float(res_after.threshold),
            "hard": int(hard.sum()),
            "hard_fraction": float(hard.mean()) if len(hard) else 0.0,
            "loss_before_mean": float(np.nanmean(before)),
            "loss_after_mean": float(np.nanmean(after)),
            "missing": int(np.isnan(after).sum()),
            "scatter": image_md(loss_scatter_png(before, after, hard, res_before.threshold, res_after.threshold),
                                "loss before vs after training"),
            "hardest": preview_md(hardest, ["sample_id", "loss_before", "loss_after", "is_hard", "instruction", "output"]),
        }
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
        default=None, description="approx only: IVF lists searched per query (default 16; more = higher recall, slower)")
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
def embedding_signals(context: AssetExecutionContext, config: EmbeddingSignalConfig, storage: StorageResource,
                      model: ModelResource, model_readouts: pl.DataFrame):
    r = round_number(context.partition_key)
    ids = model_readouts["sample_id"].to_list()
    emb = np.asarray(model_readouts["embedding"].to_list(), dtype=np.float32)
    # the exact search runs where the model runs (a GPU when there is one)
    sims, idx, knn_info = diversity.topk_cosine(emb, k=config.k, method=config.knn_method, nprobe=config.knn_nprobe,
                                                device=pick_device(model.device), return_info=True)
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
    )
    sizes = np.bincount(labels).tolist()
    meta = {
        **{f"{k}": v for k, v in res.as_metadata().items()},
        "k": config.k,
        "knn_method": knn_info["method"],
        "sparse": int(res.n_flagged),
        "sparse_fraction": float(res.fraction),
        "clusters": len(sizes),
        "cluster_sizes": json_md(sizes),
        "map_method": method,
        "sparsest": preview_md(df.sort("knn_mean_similarity"), ["sample_id", "knn_mean_similarity", "cluster", "neighbor_ids"]),
    }
    for key, value in dynamics.items():
        if isinstance(value, (int, float)):
            meta[f"dynamics_{key}"] = float(value)
    if config.umap:
        meta["cluster_map"] = image_md(cluster_map_png(xy, labels, res.flagged, f"{context.partition_key}: clusters, sparse marked"), "cluster map")
    yield Output(df, metadata=meta)
    yield band_check(int(res.n_flagged), len(ids), "embedding_signals")


# --------------------------------------------------------------------------------------
class QualitySignalConfig(ThresholdConfig):
    mode: Literal["expected", "generate"] = Field(default="expected", description="expected: score from next-token probabilities (one pass); generate: the judge writes a number that is parsed")
    judge: Literal["self", "optimizer"] = Field(default="self", description="self: this round's checkpoint judges (the paper); optimizer: the optimizer LLM judges (generate mode)")
    max_length: int = Field(default=512)
    max_batch_size: int = Field(default=16)


@asset(
    check_specs=[band_spec("quality_signals")],
    partitions_def=rounds_partitions,
    group_name="signals",
    kinds={"pytorch", "polars"},
    deps=["sft_checkpoint"],
    description=(
        "Quality signal: the checkpoint judges factuality, clarity and completeness 0-10 on the prompt alone and on "
        "prompt + response (6 judgements); low quality below mean − m·std. Failed judgements are missing, never 0."
    ),
)
def quality_signals(context: AssetExecutionContext, config: QualitySignalConfig, model: ModelResource,
                    optimizer: OptimizerResource, storage: StorageResource, round_dataset: pl.DataFrame):
    r = round_number(context.partition_key)
    store = storage.get()
    prompts, responses = _prompts_responses(round_dataset)
    progress = ProgressLogger(context.log.info, "quality judgements", unit="judgements")
    judge_info: dict = {"judge_path": f"generate ({config.judge})"}
    t0 = time.perf_counter()
    if config.judge == "optimizer":
        scores6 = quality.generated_scores(optimizer.make_backend(store), prompts, responses, progress=progress)
    else:  # the round's own checkpoint judges
        lm = model.load(str(store.checkpoint_dir(context.partition_key)))
        if config.mode == "expected":
            scores6 = quality.expected_scores(lm.model, lm.tokenizer, prompts, responses, max_length=config.max_length,
                                              max_batch_size=config.max_batch_size, progress=progress,
                                              info=judge_info)
            if judge_info["judge_path"] != "packed":
                context.log.warning(
                    f"self-judge fell back to one forward pass per judgement (about 5x slower): "
                    f"{judge_info['fallback_reason']}")
        else:  # generate
            scores6 = quality.generated_scores(make_backend("local", loaded=lm), prompts, responses, progress=progress)
    combined = quality.combine_scores(scores6)
    score = np.asarray(combined["quality_score"], dtype=np.float64)
    res = flag_below(score, config.spec(), r)
    cols = {"sample_id": round_dataset["sample_id"]}
    for j, dim in enumerate(quality.DIMENSIONS):
        cols[f"{dim}_prompt"] = scores6[:, j].astype(np.float32)
        cols[f"{dim}_full"] = scores6[:, 3 + j].astype(np.float32)
    for dim in quality.DIMENSIONS:
        cols[dim] = np.asarray(combined[dim], dtype=np.float32)
    cols["quality_score"] = score.astype(np.float32)
    cols["n_missing"] = np.asarray(combined["n_missing"], dtype=np.int64)
    cols["is_low_quality"] = res.flagged
    df = pl.DataFrame(cols)
    lowest = df.join(round_dataset.select("sample_id", "instruction", "output"), on="sample_id").sort("quality_score", nulls_last=True)
    yield Output(df, metadata=
        {
            **res.as_metadata(),
            "mode": config.mode,
            "judge": config.judge,
            "judge_path": judge_info["judge_path"],
            **({"judge_fallback_reason": str(judge_info["fallback_reason"])}
               if judge_info.get("fallback_reason") and judge_info["judge_path"] != "packed" else {}),
            "judge_seconds": round(time.perf_counter() - t0, 1),
            "low_quality": int(res.n_flagged),
            "low_quality_fraction": float(res.fraction),
            "missing_judgements": int(np.isnan(scores6).sum()),
            "score_mean": float(np.nanmean(score)) if np.isfinite(score).any() else float("nan"),
            "histograms": image_md(
                histogram_png({d: np.asarray(combined[d]) for d in quality.DIMENSIONS} | {"quality_score": score},
                              {"quality_score": float(res.threshold)}, f"{context.partition_key}: self-judged quality"),
                "quality histograms"),
            "lowest_scored": preview_md(lowest, ["sample_id", "quality_score", "factuality", "clarity", "completeness", "instruction", "output"]),
        }
    )
    yield band_check(int(res.n_flagged), df.height, "quality_signals")
