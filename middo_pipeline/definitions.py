"""The Dagster code location: assets (with their checks), jobs, schedule and resources.

Resources come from environment variables so one code location serves a laptop and a GPU box:

- MIDDO_PROFILE=default | tiny     (tiny: a random tiny model everywhere; for smoke tests)
- MIDDO_BASE_MODEL                 model to fine-tune (default: packaged SmolLM2-135M-Instruct)
- MIDDO_DEVICE                     auto | cpu | cuda
- MIDDO_OPTIMIZER_BACKEND          local | openai
- MIDDO_OPTIMIZER_MODEL            local model or served model name
- MIDDO_OPTIMIZER_BASE_URL         e.g. http://localhost:8000/v1 (vLLM)
- MIDDO_OPTIMIZER_API_KEY_ENV      name of the variable holding the key (default OPENAI_API_KEY)
- MIDDO_OPTIMIZER_CONCURRENCY      parallel requests to the server (default 8)
- MIDDO_OPTIMIZER_QUANTIZE         local backend on CPU: none | int8 (dynamic int8 Linear layers)
- MIDDO_OPTIMIZER_ENGINE           local backend: compact (default: finished rows leave the batch) | generate
- MIDDO_HOME                       storage root (default $DAGSTER_HOME/middo or ./.middo)
- MIDDO_RAY_ADDRESS                unset: one process; local | auto | ray://HEAD:10001: the loss and
                                   embedding passes run on Ray workers (extra [ray]; docs/scaling.md)
- MIDDO_RAY_WORKERS, MIDDO_RAY_CPUS_PER_WORKER, MIDDO_RAY_GPUS_PER_WORKER, MIDDO_RAY_NUM_CPUS
"""

from __future__ import annotations

import os

from dagster import Definitions, load_assets_from_modules

from middo_pipeline.assets import evaluation, ingestion, merging, quality, readouts, refinement, signals, training
from middo_pipeline.io import ParquetIOManager
from middo_pipeline.jobs import round_job, seed_job
from middo_pipeline.models.loading import DEFAULT_MODEL, TINY_MODEL
from middo_pipeline.resources import (
    EvaluationResource,
    ModelResource,
    OptimizerResource,
    RayComputeResource,
    StorageResource,
)
from middo_pipeline.schedules import nightly_round


def _positive_int(env: dict, name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text}: not a positive integer; set it to e.g. {default}, or unset it")
    return int(text)


def resources_from_env(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    profile = env.get("MIDDO_PROFILE", "default")
    if profile not in ("default", "tiny"):
        raise ValueError(f"MIDDO_PROFILE must be 'default' or 'tiny', got {profile!r}")
    default_model = TINY_MODEL if profile == "tiny" else DEFAULT_MODEL
    root = env.get("MIDDO_HOME") or None
    device = env.get("MIDDO_DEVICE", "auto")
    backend = env.get("MIDDO_OPTIMIZER_BACKEND", "local")
    if backend not in ("local", "openai"):  # one line (the resource's own validation error is several)
        raise ValueError(f"MIDDO_OPTIMIZER_BACKEND={backend}: unknown backend; use local or openai")
    if env.get("MIDDO_OPTIMIZER_QUANTIZE") not in (None, "", "none", "int8"):
        raise ValueError(f"MIDDO_OPTIMIZER_QUANTIZE={env['MIDDO_OPTIMIZER_QUANTIZE']}: use none or int8")
    if env.get("MIDDO_OPTIMIZER_ENGINE") not in (None, "", "compact", "generate"):
        raise ValueError(f"MIDDO_OPTIMIZER_ENGINE={env['MIDDO_OPTIMIZER_ENGINE']}: use compact or generate")
    return {
        "io_manager": ParquetIOManager(root=root),
        "storage": StorageResource(root=root),
        "model": ModelResource(base_model=env.get("MIDDO_BASE_MODEL", default_model), device=device),
        "optimizer": OptimizerResource(
            backend=backend,
            model=env.get("MIDDO_OPTIMIZER_MODEL", default_model),
            base_url=env.get("MIDDO_OPTIMIZER_BASE_URL") or None,
            api_key_env=env.get("MIDDO_OPTIMIZER_API_KEY_ENV", "OPENAI_API_KEY"),
            max_concurrency=_positive_int(env, "MIDDO_OPTIMIZER_CONCURRENCY", 8),
            device=device,
            **({"quantize": env["MIDDO_OPTIMIZER_QUANTIZE"]} if env.get("MIDDO_OPTIMIZER_QUANTIZE") else {}),
            **({"engine": env["MIDDO_OPTIMIZER_ENGINE"]} if env.get("MIDDO_OPTIMIZER_ENGINE") else {}),
        ),
        "ray": ray_from_env(env),
        # the one resource set per run (config file: resources: {evaluation: {config: ...}})
        "evaluation": EvaluationResource(),
    }


def ray_from_env(env: dict) -> RayComputeResource:
    """``MIDDO_RAY_ADDRESS`` (unset: off), ``MIDDO_RAY_WORKERS``, ``MIDDO_RAY_GPUS_PER_WORKER``,
    ``MIDDO_RAY_CPUS_PER_WORKER``; ``MIDDO_RAY_NUM_CPUS`` caps a ``local`` Ray's CPUs."""
    address = (env.get("MIDDO_RAY_ADDRESS") or "").strip()
    if address and not (address in ("local", "auto") or "://" in address or ":" in address):
        raise ValueError(f"MIDDO_RAY_ADDRESS={address}: use local, auto, ray://HEAD:10001 or HEAD:6379 (unset: no Ray)")

    def number(name: str, default: float) -> float:
        text = (env.get(name) or "").strip()
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"{name}={text}: not a number >= 0")
        return value

    init = {}
    if address == "local" and env.get("MIDDO_RAY_NUM_CPUS"):
        init["num_cpus"] = int(number("MIDDO_RAY_NUM_CPUS", 0))
    return RayComputeResource(
        address=address,
        workers=int(number("MIDDO_RAY_WORKERS", 0)),
        num_cpus_per_worker=number("MIDDO_RAY_CPUS_PER_WORKER", 1.0),
        num_gpus_per_worker=number("MIDDO_RAY_GPUS_PER_WORKER", 0.0),
        ray_init_options=init,
    )


def build_defs(env: dict | None = None) -> Definitions:
    """The code location, with resources from ``env`` (default: the process environment)."""
    return Definitions(
        assets=load_assets_from_modules(
            [ingestion, training, readouts, signals, quality, refinement, merging, evaluation]
        ),
        jobs=[seed_job, round_job],
        schedules=[nightly_round],
        resources=resources_from_env(env),
    )


defs = build_defs()
