"""Loop rounds as Dagster dynamic partitions: keys ``round-1``, ``round-2``, …

The step from round r-1 to round r cannot be a declared asset edge: round r's
``round_dataset`` is round r-1's ``optimized_dataset``, which is computed from round r-1's
``round_dataset``, so the edge would close a cycle round_dataset → … → optimized_dataset →
round_dataset in the asset graph, and Dagster's asset graph must be acyclic (a partition
mapping can point at earlier partitions of the asset itself, not back along a chain of other
assets). So assets read the previous round's outputs through the same storage layout and
record in their metadata where they came from. These helpers find them.
"""

from __future__ import annotations

import re
from pathlib import Path

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, DynamicPartitionsDefinition

from middo_pipeline.core.storage import Storage

ROUNDS = "rounds"
rounds_partitions = DynamicPartitionsDefinition(name=ROUNDS)
_KEY = re.compile(r"^round-([1-9][0-9]*)$")


def round_number(partition_key: str) -> int:
    m = _KEY.fullmatch(partition_key)
    if not m:
        raise ValueError(f"round partition keys look like 'round-1', 'round-2', …; got {partition_key!r}")
    return int(m.group(1))


def round_key(n: int) -> str:
    if n < 1:
        raise ValueError(f"rounds start at 1, got {n}")
    return f"round-{n}"


def previous_round(partition_key: str) -> str | None:
    """The key of the round before ``partition_key`` (None for round-1)."""
    r = round_number(partition_key)
    return round_key(r - 1) if r > 1 else None


def earlier_rounds(partition_key: str) -> list[str]:
    """The keys of every round before ``partition_key``, oldest first."""
    return [round_key(n) for n in range(1, round_number(partition_key))]


def previous_table(storage: Storage, asset: str, partition_key: str) -> Path | None:
    """Where the previous round's table of ``asset`` lives (None for round-1); the file may
    not exist yet."""
    prev = previous_round(partition_key)
    return storage.table_path(asset, prev) if prev else None


def existing_rounds(instance: DagsterInstance) -> list[int]:
    keys = instance.get_dynamic_partitions(ROUNDS)
    return sorted(round_number(k) for k in keys if _KEY.fullmatch(k))


def latest_materialization(instance: DagsterInstance, asset: str, partition: str | None = None):
    """The latest materialization record of an asset (partition), or None."""
    flt = AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition] if partition else None)
    records = instance.fetch_materializations(flt, limit=1).records
    return records[0] if records else None


def latest_metadata(instance: DagsterInstance, asset: str, partition: str | None = None) -> dict:
    """The metadata values of an asset (partition)'s latest materialization ({} if none)."""
    rec = latest_materialization(instance, asset, partition)
    md = rec.asset_materialization.metadata if rec is not None and rec.asset_materialization else {}
    return {k: v.value for k, v in md.items()}


def data_changed(instance: DagsterInstance, partition_key: str) -> bool | None:
    """Whether a round's ``optimized_dataset`` differs from the ``round_dataset`` it started
    from (their recorded fingerprints: the rows in order); None when either is not recorded."""
    before = latest_metadata(instance, "round_dataset", partition_key).get("fingerprint")
    after = latest_metadata(instance, "optimized_dataset", partition_key).get("fingerprint")
    if before is None or after is None:
        return None
    return before != after
