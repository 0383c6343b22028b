"""Step 2a of the loop: the forward passes the signals read, under the base model and this
round's checkpoint (losses, prompt-free loss, prompt embedding)."""

import json
import time
from typing import Literal

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, asset
from pydantic import Field, field_validator

from middo_pipeline.assets._meta import tidy
from middo_pipeline.assets.signals import _prompts_responses
from middo_pipeline.constants import MAX_LENGTH
from middo_pipeline.core import readout_cache
from middo_pipeline.core.checkpoints import derived_key, find_derived, require_checkpoint, source_digest
from middo_pipeline.core.forward import EmbeddingSpec
from middo_pipeline.core.progress import ProgressLogger
from middo_pipeline.core.schema import fingerprint
from middo_pipeline.resources import ModelResource, RayComputeResource, StorageResource
from middo_pipeline.rounds import earlier_rounds, rounds_partitions


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
    key = context.partition_key
    ckpt = store.checkpoint_dir(key)
    require_checkpoint(ckpt, key, fingerprint(round_dataset))
    spec = config.embedding_spec()
    record = store.ensure_dir(store.artifact_dir("model_readouts", key)) / READOUTS_RECORD
    record.unlink(missing_ok=True)  # written again once this materialization's table is known
    reuse_key = _reuse_key(ckpt, config, model, round_dataset)
    reused = _earlier_readouts(context, store, reuse_key, round_dataset)
    if reused is not None:
        q, df = reused
        record.write_text(json.dumps({"reuse_key": reuse_key, "reused_from": q}))
        context.add_output_metadata(
            _metadata(model, ckpt, spec, df.height, df.height, reused_from=q, embedding_dim=_dim(df))
        )
        return df
    prompts, responses = _prompts_responses(round_dataset)
    kw = dict(max_length=config.max_length, max_batch_tokens=config.max_batch_tokens)
    t0 = time.perf_counter()
    base_values, n_reused, base_tokens = _base_readouts(context, config, model, store, ray, prompts, responses, kw)
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
    tokens = base_tokens + after.n_tokens
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
    compute = f"ray: {workers} workers at {ray.address}" if ray.enabled else "this process"
    context.add_output_metadata(
        _metadata(
            model,
            ckpt,
            spec,
            df.height,
            n_reused,
            embedding_dim=int(after.embedding.shape[1]),
            compute=compute,
            tokens=int(tokens),
            seconds=round(seconds, 1),
            tokens_per_second=round(tokens / max(seconds, 1e-9), 1),
        )
    )
    record.write_text(json.dumps({"reuse_key": reuse_key}))
    return df


def _reuse_key(ckpt, config: ReadoutConfig, model: ModelResource, round_dataset: pl.DataFrame) -> str:
    """The key the readouts are computed under: the same weights on the same rows with the same
    settings read the same values."""
    spec = config.embedding_spec()
    return derived_key(
        ckpt,
        asset="model_readouts",
        rows=fingerprint(round_dataset),
        max_length=config.max_length,
        max_batch_tokens=config.max_batch_tokens,
        embedding=[spec.pooling, str(spec.layer)],
        load=model.load_kwargs(),
        code=source_digest(
            "core/forward.py",
            "core/model_parts.py",
            "core/ifd.py",
            "core/readout_cache.py",
            "models/loading.py",
        ),
    )


def _earlier_readouts(context, store, reuse_key: str, round_dataset: pl.DataFrame) -> tuple[str, pl.DataFrame] | None:
    """An earlier round's table computed under ``reuse_key`` on the same rows in the same order
    (a round whose checkpoint is an earlier round's, sft_checkpoint reuse_identical), and that round."""
    key = context.partition_key
    same = find_derived(
        (
            (q, store.artifact_dir("model_readouts", q) / READOUTS_RECORD, store.table_path("model_readouts", q))
            for q in reversed(earlier_rounds(key))
        ),
        reuse_key,
    )
    if same is None:
        return None
    reused = pl.read_parquet(same[1])
    if reused["sample_id"].to_list() != round_dataset["sample_id"].to_list():
        return None
    context.log.info(
        f"{key}'s checkpoint and rows are {same[0]}'s (same training key, same rows in the same order, same "
        "settings): its readouts are read, not recomputed"
    )
    return same[0], reused


def _base_readouts(context, config, model, store, ray, prompts, responses, kw) -> tuple[dict, int, int]:
    """The base model's loss before training and prompt-free loss of every sample, those of
    samples seen in earlier rounds read from the cache (``reuse_base_readouts``): (the values,
    how many were read from the cache, tokens scored). "Before training" is always the base
    model, whatever the training init: a previous round's checkpoint has already seen the kept
    samples, so new samples would look hard."""
    keys = readout_cache.row_keys(prompts, responses, config.max_length)
    cache = None
    hits: dict = {}
    if config.reuse_base_readouts:
        identity = readout_cache.model_identity(model.base_model, model.base_path(), model.load_kwargs())
        cache = readout_cache.BaseReadoutCache(store.cache_dir / "base_readouts", identity)
        hits = cache.lookup(keys)
    _, missing = readout_cache.split_hits(keys, hits)
    tokens = 0
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
        tokens = before.n_tokens + uncond.n_tokens
        computed = {"loss_before": before.loss, "loss_unconditional": uncond.loss}
    else:
        context.log.info(f"base model readouts: all {len(keys)} samples kept from earlier rounds")
    values, new_rows = readout_cache.assemble(keys, hits, missing, computed)
    if cache is not None:
        cache.add(new_rows)
    return values, len(keys) - len(missing), tokens


def _dim(df: pl.DataFrame) -> int:
    return len(df["embedding"][0]) if df.height else 0


def _metadata(model: ModelResource, ckpt, spec: EmbeddingSpec, samples: int, base_reused: int, **more) -> dict:
    """model_readouts' metadata: what was read, with which models and embedding, and at what cost."""
    reused_from = more.pop("reused_from", None)
    return tidy(
        {
            "samples": samples,
            **({"reused_from": reused_from} if reused_from else {}),
            "model_before": model.base_model,
            "checkpoint": MetadataValue.path(str(ckpt)),
            "embedding": f"{spec.pooling} pooling, layer {spec.layer}",
            "embedding_dim": more.pop("embedding_dim"),
            **({"compute": more.pop("compute")} if "compute" in more else {}),
            "base_readouts_reused": base_reused,
            **more,
        }
    )
