"""Data-parallel training: ``train_sft_processes`` launches ``torchrun --nproc_per_node N -m
middo_pipeline.core.train_main --base MODEL --samples T.parquet --out DIR --config C.json``.

Every process runs ``train_sft`` (the Trainer finds ``torchrun``'s ``RANK``/``WORLD_SIZE`` and
wraps the model in DDP), the main process writes the checkpoint and prints its progress as
``MIDDO_PROGRESS {json}`` lines, which the launcher reads back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import polars as pl

from middo_pipeline.core.training import TRAINING_INFO, TrainConfig, TrainResult, read_training_info, train_sft

PROGRESS_PREFIX = "MIDDO_PROGRESS "


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m middo_pipeline.core.train_main")
    p.add_argument("--base", required=True)
    p.add_argument("--samples", required=True, help="Parquet table of the samples (the round's dataset)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True, help="JSON of a TrainConfig")
    p.add_argument("--init-from", default=None)
    a = p.parse_args(argv)
    config = TrainConfig(**json.loads(Path(a.config).read_text()))
    main_process = os.environ.get("RANK", "0") == "0"

    def report(state: dict) -> None:
        if main_process:
            print(PROGRESS_PREFIX + json.dumps(state, default=float), flush=True)

    train_sft(a.base, pl.read_parquet(a.samples), Path(a.out), config, init_from=a.init_from, progress=report)
    return 0


def train_sft_processes(
    base_model: str,
    samples: pl.DataFrame,
    output_dir: Path,
    config: TrainConfig,
    processes: int,
    *,
    init_from: str | None = None,
    progress: Callable[[dict], None] | None = None,
    log_line: Callable[[str], None] | None = None,
) -> TrainResult:
    """``train_sft`` as ``processes`` data-parallel processes on this node (``torchrun
    --standalone``; one per GPU, or CPU processes with the gloo backend): each process takes a
    ``batch_size`` batch per step from its own part of the data and gradients are averaged, so
    a step sees ``processes × batch_size`` samples. The samples go to the workers as a Parquet
    file; the main process writes the checkpoint; progress comes back on its stdout."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="middo-ddp-") as tmp:
        table = Path(tmp) / "samples.parquet"
        samples.write_parquet(table)
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(asdict(config)))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={int(processes)}",
            "-m",
            "middo_pipeline.core.train_main",
            "--base",
            str(base_model),
            "--samples",
            str(table),
            "--out",
            str(output_dir),
            "--config",
            str(cfg),
        ] + (["--init-from", str(init_from)] if init_from else [])
        env = dict(os.environ)
        if config.threads:
            env["OMP_NUM_THREADS"] = str(config.threads)
        tail: list[str] = []
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(PROGRESS_PREFIX):
                    if progress is not None:
                        progress(json.loads(line[len(PROGRESS_PREFIX) :]))
                    continue
                tail = (tail + [line])[-40:]
                if log_line is not None and line.strip():
                    log_line(line)
            rc = proc.wait()
    if rc != 0:
        raise RuntimeError(
            f"data-parallel training ({processes} processes, torchrun) failed with exit code {rc}; "
            "its last lines:\n" + "\n".join(tail)
        )
    info = read_training_info(output_dir)
    if info is None:
        raise RuntimeError(f"data-parallel training ended without writing {output_dir / TRAINING_INFO}")
    fields = {f for f in TrainResult.__dataclass_fields__}
    data = {k: v for k, v in info.items() if k in fields}
    data["loss_history"] = [tuple(x) for x in data.get("loss_history", [])]
    return TrainResult(**data)


if __name__ == "__main__":
    sys.exit(main())
