"""Step 2 of the loop: the complexity (loss) and diversity (embedding) signals, and the threshold
config every signal shares; the readouts they read are in ``readouts``, the quality signal in ``quality``."""

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field

from middo_pipeline.assets._checks import band_check, band_spec
from middo_pipeline.assets._meta import image_md, json_md, preview_md, tidy
from middo_pipeline.core import diversity, neighbours
from middo_pipeline.core.plots import cluster_map_png, loss_scatter_png
from middo_pipeline.core.schema import prompt_text
from middo_pipeline.core.thresholds import ThresholdSpec, flag_below, flag_both_above
from middo_pipeline.models.loading import pick_device
from middo_pipeline.resources import ModelResource, StorageResource
from middo_pipeline.rounds import previous_table, round_number, rounds_partitions


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
    knn_method: neighbours.KnnMethod = Field(
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
    sims, idx, knn_info = neighbours.topk_cosine(
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
