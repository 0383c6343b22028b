"""Step 1 of the loop: fine-tune on the round's dataset."""

import json
import time
from dataclasses import asdict
from typing import Literal

import polars as pl
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from middo_pipeline.assets._meta import image_md, tidy
from middo_pipeline.constants import MAX_LENGTH
from middo_pipeline.core.checkpoints import (
    copy_checkpoint,
    find_identical,
    read_round_info,
    training_key,
    write_round_info,
)
from middo_pipeline.core.plots import loss_curve_png
from middo_pipeline.core.progress import ProgressLogger
from middo_pipeline.core.readout_cache import model_identity
from middo_pipeline.core.schema import fingerprint
from middo_pipeline.core.train_main import train_sft_processes
from middo_pipeline.core.training import TrainConfig, read_training_info, train_sft
from middo_pipeline.resources import ModelResource, StorageResource
from middo_pipeline.rounds import earlier_rounds, previous_round, rounds_partitions


class TrainingConfig(Config):
    epochs: float = Field(default=1.0)
    learning_rate: float = Field(
        default=2e-4, description="2e-4 suits LoRA; the paper used 2e-5 (Llama) / 1e-5 (Mistral) for full fine-tuning"
    )
    batch_size: int = Field(default=4)
    grad_accum: int = Field(default=1)
    max_length: int = Field(default=MAX_LENGTH, description="Tokens per sample (prompt + response)")
    lora: bool = Field(default=True, description="LoRA (merged after training) or full fine-tuning")
    lora_rank: int = Field(default=16)
    lora_alpha: int = Field(default=32)
    lora_dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA inputs (peft's default 0). 0.05 measured no different downstream (5 seeds) and "
        "made a CPU training step 1.35x slower",
    )
    seed: int = Field(default=0)
    max_steps: int = Field(default=-1, description="Stop after this many steps (-1: the epochs decide)")
    processes: int = Field(
        default=1,
        ge=1,
        description="data-parallel training processes on this machine (torchrun): one per GPU; on CPU, gloo "
        "processes that share the cores. A step then sees processes x batch_size samples",
    )
    init: Literal["base", "previous"] = Field(
        default="base",
        description="base: retrain from the base model each round (the paper); previous: continue from the previous round's checkpoint",
    )
    reuse_identical: bool = Field(
        default=True,
        description="When an earlier round's checkpoint was trained exactly as this one would be (the same rows in "
        "the same order, the same settings, base model, starting checkpoint and library versions), copy it instead "
        "of training again: a round whose data did not change (the gate accepted nothing, or a rollback returned to "
        "data trained on before) would retrain the same weights (bit-identical on CPU). false: always train",
    )

    def train_config(self, **overrides) -> TrainConfig:
        """The core ``TrainConfig``: every field of this config that it has (all but ``init``),
        plus ``overrides`` (device, threads: the model resource's). ``init`` and ``processes`` are
        the asset's own."""
        return TrainConfig(**self.model_dump(exclude={"init", "processes", "reuse_identical"}), **overrides)


def init_checkpoint(storage, partition_key: str, init: str) -> str | None:
    """The folder training starts from instead of the base model, or None for the base."""
    if init == "base":
        return None
    prev = previous_round(partition_key)
    if prev is None:
        return None
    if not storage.checkpoint_ready(prev):
        raise FileNotFoundError(
            f"init='previous' needs {prev}'s sft_checkpoint at {storage.checkpoint_dir(prev)}; materialize it first"
        )
    return str(storage.checkpoint_dir(prev))


@asset(
    partitions_def=rounds_partitions,
    group_name="loop",
    kinds={"pytorch"},
    description="Supervised fine-tuning (trl SFTTrainer, loss on response tokens) of the base model on round_dataset; a transformers-loadable model folder.",
)
def sft_checkpoint(
    context: AssetExecutionContext,
    config: TrainingConfig,
    model: ModelResource,
    storage: StorageResource,
    round_dataset: pl.DataFrame,
) -> MaterializeResult:
    store = storage.get()
    key = context.partition_key
    target = store.checkpoint_dir(key)
    start = init_checkpoint(store, key, config.init)
    train_cfg = config.train_config(device=model.device, threads=model.threads)
    trained_on = fingerprint(round_dataset)
    tkey = training_key(
        trained_on=trained_on,
        settings=asdict(train_cfg) | {"processes": config.processes},
        base_model=model_identity(model.base_model, model.base_path(), model.load_kwargs()),
        init_from=start,
        init_key=read_round_info(start).get("training_key") if start else None,
    )
    same = None
    if config.reuse_identical:
        same = find_identical(((k, store.checkpoint_dir(k)) for k in reversed(earlier_rounds(key))), tkey)
    if same is not None:
        return _reuse(context, store, model, round_dataset, same, tkey, start)
    progress = ProgressLogger(context.log.info, "training", unit="steps")

    def on_log(state: dict) -> None:
        if state.get("max_steps"):
            progress(int(state.get("step", 0)), int(state["max_steps"]))

    context.log.info(f"fine-tuning {start or model.base_model} on {round_dataset.height} samples -> {target}")
    with store.lock("sft_checkpoint", key), store.atomic_path(target, is_dir=True) as tmp:
        if config.processes > 1:
            context.log.info(f"data parallel: {config.processes} training processes (torchrun --standalone)")
            result = train_sft_processes(
                model.base_path(),
                round_dataset,
                tmp,
                train_cfg,
                config.processes,
                init_from=start,
                progress=on_log,
                log_line=context.log.debug,
            )
        else:
            result = train_sft(model.base_path(), round_dataset, tmp, train_cfg, init_from=start, progress=on_log)
        write_round_info(
            tmp,
            round_key=key,
            base_model=model.base_model,
            initialized_from=start,
            trained_on=trained_on,
            samples=round_dataset.height,
            training_key=tkey,
        )
    history = [(int(s), float(loss)) for s, loss in result.loss_history]
    return MaterializeResult(
        metadata=tidy(
            {
                "path": MetadataValue.path(str(target)),
                "base_model": model.base_model,
                "initialized_from": start or "base model",
                "lora": config.lora,
                "samples": round_dataset.height,
                "trained_on": trained_on,
                "training_key": tkey or "none (started from a checkpoint without one)",
                "steps": result.steps,
                "processes": result.processes,
                "tokens_seen": result.tokens_seen,
                "seconds": round(result.seconds, 2),
                "tokens_per_second": round(result.tokens_per_second, 1),
                "final_loss": float(result.final_loss),
                "loss_curve": image_md(loss_curve_png(history), "training loss"),
                "loss_history": MetadataValue.json(json.loads(json.dumps(history))),
            },
            first=("final_loss", "steps", "samples", "loss_curve"),
        )
    )


def _reuse(
    context, store, model, round_dataset: pl.DataFrame, same: tuple[str, object], tkey: str, start
) -> MaterializeResult:
    """This round's checkpoint as a copy of ``same``'s, whose training this one would repeat
    exactly; the metadata describes the weights (the training that made them, in that round)."""
    source_round, source = same
    key = context.partition_key
    t0 = time.monotonic()
    context.log.info(
        f"{key} would train exactly as {source_round} did (same rows in the same order, same settings, base model "
        f"and library versions: training key {tkey}): its checkpoint is copied, not retrained "
        "(reuse_identical: false retrains)"
    )
    with store.lock("sft_checkpoint", key), store.atomic_path(store.checkpoint_dir(key), is_dir=True) as tmp:
        copy_checkpoint(source, tmp)
        write_round_info(
            tmp,
            round_key=key,
            base_model=model.base_model,
            initialized_from=start,
            trained_on=fingerprint(round_dataset),
            samples=round_dataset.height,
            training_key=tkey,
            reused_from=source_round,
        )
    info = read_training_info(store.checkpoint_dir(key)) or {}
    history = [(int(s), float(loss)) for s, loss in info.get("loss_history") or []]
    meta = {
        "path": MetadataValue.path(str(store.checkpoint_dir(key))),
        "reused_from": source_round,
        "reuse_reason": f"same training as {source_round}'s (training key {tkey}): copied, not retrained",
        "copy_seconds": round(time.monotonic() - t0, 2),
        "training_seconds_saved": round(float(info.get("total_seconds") or info.get("seconds") or 0.0), 1),
        "base_model": model.base_model,
        "initialized_from": start or "base model",
        "lora": bool(info.get("lora", True)),
        "samples": round_dataset.height,
        "trained_on": fingerprint(round_dataset),
        "training_key": tkey,
    }
    for name in ("steps", "processes", "tokens_seen"):
        if name in info:
            meta[name] = int(info[name])
    if info.get("final_loss") is not None:
        meta["final_loss"] = float(info["final_loss"])
    if history:
        meta["loss_curve"] = image_md(loss_curve_png(history), f"training loss ({source_round}'s run)")
        meta["loss_history"] = MetadataValue.json(json.loads(json.dumps(history)))
    return MaterializeResult(metadata=tidy(meta, first=("reused_from", "final_loss", "steps", "samples", "loss_curve")))
