"""Step 1 of the loop: supervised fine-tuning (SFT) with trl, loss on the response only.

``train_sft`` turns a canonical sample table into a prompt/completion *conversational*
dataset (user turn = ``prompt_text(instruction, input)``, assistant turn = ``output``), so
trl's ``SFTTrainer`` renders it with the model's chat template and masks every prompt token
(labels -100): the loss is on the response tokens (and the end-of-turn token) only, as in
the paper. LoRA (peft) by default, merged into the weights after training; or full
fine-tuning. The result is always a plain model folder that
``AutoModelForCausalLM.from_pretrained`` loads directly, with the tokenizer beside it and
``middo_training.json`` recording what was done.

Everything runs offline: the model and tokenizer are loaded from local folders and handed to
the trainer as objects (``processing_class`` is always passed, so trl never asks a hub).
The dataset and chat template are built in ``sft_data``; ``train_main`` runs this as several
data-parallel processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from middo_pipeline.constants import MAX_LENGTH
from middo_pipeline.core.sft_data import build_sft_dataset, ensure_chat_template, literal_control_strings

log = logging.getLogger(__name__)

TRAINING_INFO = "middo_training.json"  # written into every checkpoint folder


@dataclass
class TrainConfig:
    """How to fine-tune. Defaults suit LoRA on a small model.

    ``learning_rate`` 2e-4 is a LoRA learning rate. The paper fine-tunes *all* weights with
    2e-5 (Llama-3.1-8B) / 1e-5 (Mistral-7B), 1 epoch, cosine, 3 % warm-up: for full
    fine-tuning (``lora=False``) use 2e-5.
    """

    epochs: float = 1.0  # passes over the data (fractions allowed); max_steps > 0 overrides
    learning_rate: float = 2e-4  # LoRA; 2e-5 for full fine-tuning (the paper)
    batch_size: int = 4  # per device
    grad_accum: int = 1  # optimizer step every grad_accum batches
    max_length: int = (
        MAX_LENGTH  # tokens per sample (chat template + prompt + response); longer ones are cut at the end
    )
    lora: bool = True  # False: full fine-tuning
    lora_rank: int = 16
    lora_alpha: int = 32
    # peft's own default; 0.05 trained no different model and a CPU step 1.35x slower
    # (docs/decisions/lora-dropout.md)
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"  # peft: every linear layer except the output head
    # fraction of the optimizer steps spent warming up (paper: 3 %), rounded *down*: runs under
    # 34 steps get none (transformers rounds up, and a warm-up step starts at learning rate 0, so
    # a 1-step run would not train at all)
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"  # any transformers scheduler name
    seed: int = 0  # adapter init, data order, dropout
    max_steps: int = -1  # > 0: stop after this many optimizer steps (-1: epochs decide)
    logging_steps: int = 1  # a loss point (and a progress call) every N optimizer steps
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int | None = None  # torch CPU threads (None: torch's default, all cores)
    activation_checkpointing: bool = False  # recompute activations to save GPU memory; always off on CPU


@dataclass
class TrainResult:
    output_dir: str
    steps: int  # optimizer steps taken
    tokens_seen: int  # non-padding tokens (prompt + response) in the batches trained on
    seconds: float  # wall time of the training loop (without loading / merging / saving)
    tokens_per_second: float
    final_loss: float  # last logged training loss (nan when nothing was logged)
    loss_history: list[tuple[int, float]]  # (optimizer step, training loss)
    lora: bool
    base_model: str  # the model name or folder the run is based on
    initialized_from: str | None = None  # the checkpoint training continued from (None: the base model)
    samples: int = 0  # rows handed in
    samples_trained: int = 0  # rows left after trl dropped those whose prompt alone fills max_length
    completion_tokens: int = 0  # response tokens (labels != -100) per epoch of the prepared dataset
    total_seconds: float = 0.0  # the whole call: loading, training, merging, saving
    warmup_steps: int = 0
    device: str = ""
    processes: int = 1  # data-parallel training processes (torchrun); tokens_seen counts the main one's


def _saved_dtype(model_dir: str):
    """The dtype the source checkpoint is stored in (None: unknown / not a local folder)."""
    import torch

    cfg = Path(model_dir) / "config.json"
    if not cfg.exists():
        return None
    data = json.loads(cfg.read_text())
    name = data.get("dtype") or data.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(str(name))


# --------------------------------------------------------------------------------------------
# trainer


def _sft_config(config: TrainConfig, scratch: Path, device) -> Any:
    import torch
    from trl import SFTConfig

    on_cuda = device.type == "cuda"
    bf16 = bool(on_cuda and torch.cuda.is_bf16_supported())
    return SFTConfig(
        output_dir=str(scratch),
        num_train_epochs=float(config.epochs),
        max_steps=int(config.max_steps),
        learning_rate=float(config.learning_rate),
        per_device_train_batch_size=int(config.batch_size),
        gradient_accumulation_steps=int(config.grad_accum),
        max_length=int(config.max_length),
        # transformers 5 dropped `warmup_ratio` (a float < 1 in `warmup_steps` is a ratio, rounded
        # up); build_trainer sets the step count from the prepared dataset instead
        warmup_steps=0,
        lr_scheduler_type=config.lr_scheduler,
        seed=int(config.seed),
        data_seed=int(config.seed),
        logging_strategy="steps",
        logging_steps=int(config.logging_steps),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        push_to_hub=False,
        disable_tqdm=True,
        # SFTConfig defaults to bf16=True and activation checkpointing: both wrong on CPU
        bf16=bf16,
        fp16=False,
        activation_checkpointing=bool(config.activation_checkpointing and on_cuda),
        use_cpu=device.type == "cpu",
        dataloader_pin_memory=on_cuda,
        dataloader_num_workers=0,
        # counts the attention mask of every batch trained on -> state.num_input_tokens_seen
        include_num_input_tokens_seen="non_padding",
        # under torchrun (data parallel): every trainable parameter (LoRA or all) gets a gradient
        ddp_find_unused_parameters=False,
        packing=False,
        completion_only_loss=True,  # prompt/completion data: mask the prompt (also trl's default)
        assistant_only_loss=False,
    )


class _ProgressCallback:
    """TrainerCallback that reports every trainer log to ``progress(dict)``."""

    def __init__(self, progress: Callable[[dict], None] | None):
        self.progress = progress
        self.start = time.monotonic()

    def make(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.start = time.monotonic()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if outer.progress is None:
                    return
                logs = logs or {}
                elapsed = time.monotonic() - outer.start
                step, total = int(state.global_step), int(state.max_steps or 0)
                eta = elapsed / step * max(total - step, 0) if step > 0 and total else float("nan")
                final = "train_loss" in logs  # the summary log at the end of training
                loss = logs.get("train_loss") if final else logs.get("loss")
                outer.progress(
                    {
                        "step": step,
                        "max_steps": total,
                        "epoch": float(state.epoch or 0.0),
                        "loss": float(loss) if loss is not None else None,
                        "learning_rate": logs.get("learning_rate"),
                        "tokens_seen": int(state.num_input_tokens_seen or 0),
                        "elapsed": elapsed,
                        "eta": eta,
                        "final": final,  # True once: loss is then the mean over the whole run
                    }
                )

        return _CB()


def build_trainer(
    model,
    tokenizer,
    samples: pl.DataFrame,
    config: TrainConfig,
    scratch_dir: Path,
    *,
    device=None,
    progress: Callable[[dict], None] | None = None,
):
    """The configured ``SFTTrainer`` (LoRA-wrapped when ``config.lora``), not yet trained.

    Public so tests can inspect the prepared dataset and the collated batches.
    """
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from middo_pipeline.models.loading import pick_device

    dev = device if device is not None else pick_device(config.device)
    ensure_chat_template(tokenizer)
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=int(config.lora_rank),
            lora_alpha=int(config.lora_alpha),
            lora_dropout=float(config.lora_dropout),
            target_modules=config.lora_target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
    set_seed(int(config.seed))
    with _quiet_datasets(), warnings.catch_warnings():
        # peft 0.21 reads the deprecated `is_gradient_checkpointing` of transformers 5: noise
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trainer = SFTTrainer(
            model=model,
            args=_sft_config(config, scratch_dir, dev),
            train_dataset=build_sft_dataset(samples),
            processing_class=tokenizer,  # always: without it trl asks the hub for one
            peft_config=peft_config,
            callbacks=[_ProgressCallback(progress).make()],
        )
    trainer.train_dataset = literal_control_strings(trainer.train_dataset, tokenizer, int(config.max_length))
    # with disable_tqdm the Trainer prints every log dict to stdout; progress() reports instead
    trainer.remove_callback(PrinterCallback)
    # the scheduler is only created in train(): set the warm-up now that the dataset size is known
    trainer.args.warmup_steps = int(config.warmup_ratio * planned_steps(len(trainer.train_dataset), config))
    return trainer


@contextlib.contextmanager
def score_completion_only():
    """Score only the response positions in trl's fused LM head on every device.

    trl 1.16 computes the loss through a chunked LM head (``ChunkedLogProbFunction``). Where
    Triton runs it is handed only the positions that have a label; elsewhere (the CPU) it scores
    *every* position (prompt and padding too, masked to zero afterwards) so that compiled tile
    shapes stay fixed (trl's comment names Neuron). Eager CPU code compiles nothing, and on the
    default the response is 29 % of the padded positions: scoring the rest cost about 22 % of a
    training step (measured on the shipped seed, 8 steps: 3.2-3.4 vs 2.5-2.6 s per step, loss
    history equal to 6 decimals). Same loss and gradient: the masked positions contribute zero
    either way. trl decides by ``trl.trainer.utils._use_triton``; it is widened for the CPU
    while training and restored after. A trl without that name trains the ordinary way.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:  # pragma: no cover
        yield False
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:  # another trl: nothing to widen
        log.info("trl has no _use_triton: the LM head scores every position (slower on the CPU, same loss)")
        yield False
        return
    trl_utils._use_triton = lambda device: bool(original(device)) or getattr(device, "type", None) == "cpu"
    try:
        yield True
    finally:
        trl_utils._use_triton = original


def world_size() -> int:
    """Training processes of this run (``torchrun`` sets ``WORLD_SIZE``; 1 otherwise)."""
    return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)


def planned_steps(n_samples: int, config: TrainConfig) -> int:
    """Optimizer steps a run will take (transformers' own arithmetic; under data parallelism
    every process takes a ``batch_size`` batch per step)."""
    if config.max_steps > 0:
        return int(config.max_steps)
    batches = math.ceil(n_samples / max(config.batch_size * world_size(), 1))
    per_epoch = max(math.ceil(batches / max(config.grad_accum, 1)), 1)
    return math.ceil(config.epochs * per_epoch)


@contextlib.contextmanager
def _quiet_datasets():
    """No ``datasets`` progress bars while trl prepares the data (they flood run logs)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover
        yield
        return
    was_disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------
# the entry point


def train_sft(
    base_model: str,
    samples: pl.DataFrame,
    output_dir: Path,
    config: TrainConfig,
    *,
    init_from: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fine-tune ``base_model`` (or the checkpoint ``init_from``) on ``samples``; write a plain
    model folder + tokenizer + ``middo_training.json`` to ``output_dir``.

    ``progress`` gets a dict on every trainer log: step, max_steps, epoch, loss,
    learning_rate, tokens_seen, elapsed (s), eta (s).
    """
    import torch

    from middo_pipeline.models.loading import pick_device, resolve_model_path

    t_all = time.monotonic()
    if samples.height == 0:
        raise ValueError("cannot fine-tune on an empty dataset")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    output_dir = Path(output_dir)
    device = pick_device(config.device)
    source = resolve_model_path(init_from) if init_from else resolve_model_path(base_model)

    model, tokenizer, template_added, use_cache = _load_for_training(source, config)
    store_dtype = _saved_dtype(source)  # the trained weights are saved as the source was (fp32 when unknown)

    with tempfile.TemporaryDirectory(prefix="middo-sft-") as scratch:
        trainer = build_trainer(model, tokenizer, samples, config, Path(scratch), device=device, progress=progress)
        samples_trained, completion_tokens = _prepared_counts(trainer.train_dataset, samples.height, config)
        warmup_steps = trainer.args.warmup_steps
        t0 = time.monotonic()
        with score_completion_only():
            trainer.train()
        seconds = time.monotonic() - t0
        state = trainer.state
        trained = trainer.model

        main = bool(trainer.accelerator.is_main_process)

    history = [(int(e["step"]), float(e["loss"])) for e in state.log_history if "loss" in e]
    tokens_seen = int(state.num_input_tokens_seen or 0)

    trained = _plain_weights(trained, config, store_dtype, use_cache)
    if main:  # under data parallelism every process holds the same weights: one writes them
        output_dir.mkdir(parents=True, exist_ok=True)
        trained.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)

    result = TrainResult(
        output_dir=str(output_dir),
        steps=int(state.global_step),
        tokens_seen=tokens_seen,
        seconds=seconds,
        tokens_per_second=tokens_seen / seconds if seconds > 0 else 0.0,
        final_loss=history[-1][1] if history else math.nan,
        loss_history=history,
        lora=bool(config.lora),
        base_model=str(base_model),
        initialized_from=str(init_from) if init_from else None,
        samples=samples.height,
        samples_trained=samples_trained,
        completion_tokens=completion_tokens,
        total_seconds=time.monotonic() - t_all,
        warmup_steps=int(warmup_steps),
        device=str(device),
        processes=world_size(),
    )
    if main:
        _write_training_info(output_dir, result, config, source, template_added, store_dtype)
    del trainer, trained, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _load_for_training(source: str, config: TrainConfig) -> tuple:
    """(model, tokenizer, whether the fallback chat template was added, the model's use_cache
    setting): fp32 master weights on the CPU (on CUDA the trainer adds bf16 autocast when
    supported), the KV cache off while training."""
    from middo_pipeline.models.loading import load_model

    loaded = load_model(source, device="cpu", dtype="float32", threads=config.threads, eval_mode=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    template_added = ensure_chat_template(tokenizer)
    if template_added:
        log.warning("%s has no chat template: using the Alpaca-style fallback (saved with the checkpoint)", source)
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache:
        model.config.use_cache = False  # no KV cache while training; restored before saving
    return model, tokenizer, template_added, use_cache


def _prepared_counts(prepared, n_samples: int, config: TrainConfig) -> tuple[int, int]:
    """(rows trl kept, response tokens per epoch) of the prepared dataset; a warning for the rows
    it dropped, an error when none is left."""
    samples_trained = len(prepared)
    completion_tokens = int(sum(sum(1 for t in row if t != -100) for row in prepared["labels"]))
    if samples_trained < n_samples:
        log.warning(
            "%d of %d samples dropped: their prompt alone fills max_length=%d",
            n_samples - samples_trained,
            n_samples,
            config.max_length,
        )
    if samples_trained == 0:
        raise ValueError(f"no sample fits max_length={config.max_length}: every prompt fills it")
    return samples_trained, completion_tokens


def _plain_weights(trained, config: TrainConfig, store_dtype, use_cache):
    """The trained model as it is saved: LoRA merged, on the CPU, in the source's dtype, in eval
    mode, its KV cache setting restored."""
    import torch

    if config.lora:
        trained = trained.merge_and_unload()  # plain weights: no adapter, no peft needed to load
    trained = trained.to("cpu")
    if store_dtype is not None and store_dtype != torch.float32:
        trained = trained.to(store_dtype)
    trained.eval()
    if use_cache:
        trained.config.use_cache = True
    return trained


def _write_training_info(output_dir: Path, result: TrainResult, config, source, template_added, store_dtype) -> None:
    """``middo_training.json``: the result, the settings, where the weights came from."""
    import torch

    info = {
        **asdict(result),
        "config": asdict(config),
        "model_source": source,
        "chat_template": "fallback (added)" if template_added else "the model's own",
        "saved_dtype": str(store_dtype or torch.float32).replace("torch.", ""),
    }
    (output_dir / TRAINING_INFO).write_text(json.dumps(info, indent=2, default=str))


def read_training_info(checkpoint_dir: str | Path) -> dict | None:
    """The ``middo_training.json`` of a checkpoint folder, or None when it has none."""
    path = Path(checkpoint_dir) / TRAINING_INFO
    return json.loads(path.read_text()) if path.exists() else None
