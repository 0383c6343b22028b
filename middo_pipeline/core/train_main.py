"""One process of data-parallel training: ``torchrun --nproc_per_node N -m
middo_pipeline.core.train_main --base MODEL --samples T.parquet --out DIR --config C.json``.

What ``training.train_sft_processes`` launches; every process runs ``train_sft`` (the Trainer
finds ``torchrun``'s ``RANK``/``WORLD_SIZE`` and wraps the model in DDP), the main process
writes the checkpoint and prints its progress as ``MIDDO_PROGRESS {json}`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import polars as pl

from middo_pipeline.core.training import PROGRESS_PREFIX, TrainConfig, train_sft


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


if __name__ == "__main__":
    sys.exit(main())
