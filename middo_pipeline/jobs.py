"""Jobs: the seed ingestion, and one loop round (a partition of ``rounds``)."""

from dagster import AssetSelection, define_asset_job

from middo_pipeline.rounds import rounds_partitions

ROUND_JOB = "middo_round"
SEED_JOB = "seed_job"

seed_job = define_asset_job(
    SEED_JOB,
    selection=AssetSelection.assets("seed_dataset", "seed_quarantine"),
    description="Read, validate and store the seed file (quarantine in its own table).",
)

round_job = define_asset_job(
    ROUND_JOB,
    selection=AssetSelection.groups("loop", "signals", "optimize", "evaluate"),
    partitions_def=rounds_partitions,
    description="One Middo round: train → diagnose (loss, embedding, quality) → optimize → merge → evaluate.",
)
