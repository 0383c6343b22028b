"""What a round's checkpoint records about itself, and the check every reader makes.

Each checkpoint folder holds ``middo_round.json``: the round, the base model, the folder
training started from (None: the base model) and the fingerprint of the sample table it was
trained on (``schema.fingerprint``: its ordered sample ids). Every asset that reads a
checkpoint calls ``require_checkpoint`` with the table it is about to score: a checkpoint
trained on other data (a stale one left by an earlier run, a round re-ingested since) is
refused with a clear message instead of being read against the wrong samples.
"""

from __future__ import annotations

import json
from pathlib import Path

ROUND_INFO = "middo_round.json"

__all__ = ["ROUND_INFO", "write_round_info", "read_round_info", "trained_from", "require_checkpoint", "StaleCheckpoint"]


class StaleCheckpoint(RuntimeError):
    """The checkpoint was trained on another table than the one being scored."""


def write_round_info(
    folder: Path, *, round_key: str, base_model: str, initialized_from: str | None, trained_on: str, samples: int
) -> None:
    (Path(folder) / ROUND_INFO).write_text(
        json.dumps(
            {
                "round": round_key,
                "base_model": base_model,
                "initialized_from": initialized_from,
                "trained_on": trained_on,
                "samples": samples,
            },
            indent=1,
        )
    )


def read_round_info(folder: Path) -> dict:
    info = Path(folder) / ROUND_INFO
    if not info.exists():
        return {}
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return {}


def trained_from(folder: Path) -> str | None:
    """The folder a checkpoint was initialised from (None: the base model)."""
    return read_round_info(folder).get("initialized_from")


def require_checkpoint(folder: Path, round_key: str, fingerprint: str) -> dict:
    """The checkpoint's round info, after checking it exists and was trained on the table
    whose fingerprint is ``fingerprint``; raises FileNotFoundError or StaleCheckpoint."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no sft_checkpoint for {round_key} at {folder}: materialize sft_checkpoint first")
    info = read_round_info(folder)
    got = info.get("trained_on")
    if got is None:
        raise StaleCheckpoint(
            f"the sft_checkpoint of {round_key} at {folder} does not record which data it was trained on "
            f"(written by an older version): re-materialize sft_checkpoint for {round_key}"
        )
    if got != fingerprint:
        raise StaleCheckpoint(
            f"the sft_checkpoint of {round_key} was trained on another round_dataset (fingerprint {got}) than the "
            f"one being scored ({fingerprint}): re-materialize sft_checkpoint for {round_key} before its signals"
        )
    return info
