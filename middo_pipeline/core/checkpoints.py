"""What a round's checkpoint records about itself, and the check every reader makes.

Each checkpoint folder holds ``middo_round.json``: the round, the base model, the folder
training started from (None: the base model) and the fingerprint of the sample table it was
trained on (``schema.fingerprint``: its ordered sample ids). Every asset that reads a
checkpoint calls ``require_checkpoint`` with the table it is about to score: a checkpoint
trained on other data (a stale one left by an earlier run, a round re-ingested since) is
refused with a clear message instead of being read against the wrong samples.

The round info also holds the checkpoint's ``training_key``: a hash of everything that decides
its weights (the rows in order, the training settings, the base model's files, the checkpoint
it started from, the library versions). A round whose training would repeat an earlier round's
exactly (its data did not change: the gate accepted nothing, or a rollback returned to data
trained on before) finds that checkpoint with ``find_identical`` and copies it
(``copy_checkpoint``) instead of training again: on CPU the retrained weights are bit-identical
(the default demo's round-1 and round-2 ``model.safetensors`` have the same sha256).
What is read off a checkpoint follows: ``derived_key`` hashes the checkpoint's training key
with the other inputs of a readout (the rows, its settings), and an asset whose earlier round
recorded the same key (``find_derived``) reads that round's table instead of recomputing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

ROUND_INFO = "middo_round.json"
# the packages whose versions can change what training writes: part of every training key
TRAINING_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "middo-pipeline")
# our modules that decide what training writes (the package's version does not move with every
# commit, so their source is hashed too): the trainer, its torchrun entry point, model loading,
# the SFT data and chat template, the prompt format
TRAINING_CODE = (
    "core/training.py",
    "core/train_main.py",
    "models/loading.py",
    "core/sft_data.py",
    "core/schema.py",
)
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "ROUND_INFO",
    "write_round_info",
    "read_round_info",
    "trained_from",
    "require_checkpoint",
    "StaleCheckpoint",
    "training_key",
    "find_identical",
    "copy_checkpoint",
    "derived_key",
    "find_derived",
    "source_digest",
]


class StaleCheckpoint(RuntimeError):
    """The checkpoint was trained on another table than the one being scored."""


def write_round_info(
    folder: Path,
    *,
    round_key: str,
    base_model: str,
    initialized_from: str | None,
    trained_on: str,
    samples: int,
    training_key: str | None = None,
    reused_from: str | None = None,
) -> None:
    info = {
        "round": round_key,
        "base_model": base_model,
        "initialized_from": initialized_from,
        "trained_on": trained_on,
        "samples": samples,
        "training_key": training_key,
    }
    if reused_from:
        info["reused_from"] = reused_from
    path = Path(folder) / ROUND_INFO
    path.unlink(missing_ok=True)  # a new file, never one shared with the checkpoint it was copied from
    path.write_text(json.dumps(info, indent=1))


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


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in TRAINING_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def source_digest(*relative: str) -> str:
    """A hash of the source of this package's files ``relative`` (to the package folder)."""
    h = hashlib.sha256()
    for rel in relative:
        h.update(rel.encode() + b"\0" + (PACKAGE_ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def training_key(
    *, trained_on: str, settings: dict, base_model: str, init_from: str | None = None, init_key: str | None = None
) -> str | None:
    """A hash of what decides a checkpoint's weights: ``trained_on`` (the table's fingerprint:
    its sample ids in order, which hash the text), the training ``settings`` (every field of the
    core ``TrainConfig``, device and threads included, plus the number of processes),
    ``base_model`` (an identity that changes with the model's files and load settings), the
    training key of the checkpoint it starts from (``init_key``), the versions of
    ``TRAINING_PACKAGES`` and the source of ``TRAINING_CODE``. None when training starts from a checkpoint whose own key is unknown
    (written before keys existed): such a checkpoint is never reused."""
    if init_from is not None and not init_key:
        return None
    parts = {
        "trained_on": trained_on,
        "settings": settings,
        "base_model": base_model,
        "init": init_key,
        "versions": _versions(),
        "code": source_digest(*TRAINING_CODE),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def find_identical(candidates: Iterable[tuple[str, Path]], key: str | None) -> tuple[str, Path] | None:
    """The first ``(round, folder)`` of ``candidates`` holding a loadable checkpoint whose
    training key is ``key``, or None."""
    if not key:
        return None
    for round_key, folder in candidates:
        folder = Path(folder)
        if (folder / "config.json").exists() and read_round_info(folder).get("training_key") == key:
            return round_key, folder
    return None


def copy_checkpoint(source: Path, target: Path) -> None:
    """Every file of the checkpoint ``source`` into ``target`` but its round info (the caller
    writes its own): hard links where the file system allows (checkpoints are written once, in
    a new folder, never edited in place), copies otherwise."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if rel.as_posix() == ROUND_INFO:
            continue
        dest = target / rel
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


def derived_key(checkpoint: Path, **inputs) -> str | None:
    """A key for a result computed from ``checkpoint``'s weights and ``inputs`` (the rows'
    fingerprint, the settings of the computation): equal keys, equal results. None when the
    checkpoint records no training key."""
    tkey = read_round_info(checkpoint).get("training_key")
    if not tkey:
        return None
    parts = {"training_key": tkey, "inputs": inputs}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def find_derived(candidates: Iterable[tuple[str, Path, Path]], key: str | None) -> tuple[str, Path, dict] | None:
    """The first ``(round, table, record)`` of ``candidates`` — ``(round, record file, table)``
    triples, newest round first — whose record (JSON) holds ``reuse_key == key`` and whose table
    exists, or None."""
    if not key:
        return None
    for round_key, record, table in candidates:
        record, table = Path(record), Path(table)
        if not (record.exists() and table.exists()):
            continue
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if info.get("reuse_key") == key:
            return round_key, table, info
    return None
