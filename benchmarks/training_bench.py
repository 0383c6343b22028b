"""Training: the pipeline's fine-tuning step (``core.training``: trl's ``SFTTrainer``, LoRA, the
default ``TrainConfig``) on the shipped seed rows, with trl's chunked LM head scoring only the
response positions (``score_completion_only``, what the pipeline does) against scoring every
position (trl's own choice on the CPU: prompt and padding too, masked afterwards).

Each way trains ``train_steps`` optimizer steps from the same base model, seed and data order,
``train_repeats`` times alternated; the best time counts. Reported: seconds per step,
non-padding tokens/s, the speed-up, whether the loss histories agree and whether the trained
LoRA weights are bit-identical (the positions left out contribute zero to loss and gradient).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_seed_rows, log


def _config(settings, steps: int):
    """The pipeline's default training config, for ``steps`` steps on the CPU."""
    from middo_pipeline.core.training import TrainConfig

    return TrainConfig(max_steps=steps, max_length=settings.max_length, threads=settings.threads, device="cpu")


def _train_once(settings, samples, narrow: bool, steps: int) -> dict:
    from middo_pipeline.core.training import build_trainer, score_completion_only
    from middo_pipeline.models.loading import load_model, resolve_model_path

    cfg = _config(settings, steps)
    loaded = load_model(resolve_model_path(settings.model), device="cpu", dtype="float32", eval_mode=False)
    loaded.model.config.use_cache = False
    with tempfile.TemporaryDirectory(prefix="middo-bench-train-") as tmp:
        trainer = build_trainer(loaded.model, loaded.tokenizer, samples, cfg, Path(tmp))
        with score_completion_only() if narrow else contextlib.nullcontext():
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
        digest = hashlib.sha256()
        for name, value in sorted(trainer.model.state_dict().items()):
            if "lora_" in name:
                digest.update(value.detach().cpu().numpy().tobytes())
        return {
            "seconds": seconds,
            "steps": int(trainer.state.global_step),
            "tokens": int(trainer.state.num_input_tokens_seen or 0),
            "losses": [float(e["loss"]) for e in trainer.state.log_history if "loss" in e],
            "lora_sha256": digest.hexdigest(),
        }


def run(settings, models=None) -> dict:
    import torch

    from middo_pipeline.core.schema import make_samples

    if settings.device not in ("auto", "cpu") or torch.cuda.is_available():
        # on a GPU trl already scores the response positions only (its Triton path)
        return {"skipped": True, "reason": "measures the CPU path (trl narrows the LM head itself on CUDA)"}
    samples = make_samples(load_seed_rows())
    steps = int(settings.train_steps)
    log(f"training: {steps} LoRA steps on the seed rows, response positions only vs every position")
    best: dict[str, dict] = {}
    for rep in range(int(settings.train_repeats)):
        for name, narrow in (("every_position", False), ("response_positions", True)):
            r = _train_once(settings, samples, narrow, steps)
            log(f"training: {name} (repeat {rep + 1}): {r['seconds'] / max(r['steps'], 1):.2f} s/step")
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
    cfg = _config(settings, steps)
    out: dict = {"steps": steps, "batch_size": cfg.batch_size, "max_length": cfg.max_length, "rows": samples.height}
    for name, r in best.items():
        out[name] = {
            "seconds": r["seconds"],
            "seconds_per_step": r["seconds"] / max(r["steps"], 1),
            "tokens_per_second": r["tokens"] / r["seconds"] if r["seconds"] > 0 else None,
            "tokens": r["tokens"],
            "losses": r["losses"],
        }
    wide, narrow = best["every_position"], best["response_positions"]
    out["speedup"] = wide["seconds"] / narrow["seconds"] if narrow["seconds"] > 0 else None
    out["max_abs_loss_diff"] = max((abs(a - b) for a, b in zip(wide["losses"], narrow["losses"])), default=None)
    out["lora_weights_identical"] = wide["lora_sha256"] == narrow["lora_sha256"]
    log(
        f"training: speed-up {out['speedup']:.2f}x, max |loss diff| {out['max_abs_loss_diff']:.1e}, "
        f"LoRA weights identical: {out['lora_weights_identical']}"
    )
    return out
