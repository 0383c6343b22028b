"""Dagster resources: where files live, which model is trained and judged, which LLM optimizes.

Each is a thin configurable wrapper over a plain module in ``middo_pipeline.core`` or
``middo_pipeline.models``; swapping the laptop default for a GPU model or a vLLM server is a
matter of resource config (see docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Literal
from urllib.parse import urlsplit

from dagster import ConfigurableResource, InitResourceContext
from dagster_ray import RayResource
from pydantic import Field

from middo_pipeline.core.llm import BackendKind
from middo_pipeline.core.llm.local import DEFAULT_BATCH_SIZE, DEFAULT_ENGINE, DEFAULT_QUANTIZE
from middo_pipeline.core.llm.protocol import LLMBackend
from middo_pipeline.core.rollback import ROLLBACK_NOISE_FLOOR, OnRegression, RollbackPolicy
from middo_pipeline.core.storage import Storage
from middo_pipeline.models.loading import DEFAULT_MODEL, DType, LoadedModel, load_model, resolve_model_path
from middo_pipeline.packaged import HELDOUT, data_file


class StorageResource(ConfigurableResource):
    """The one folder that holds tables, checkpoints, plots and caches."""

    root: str | None = Field(default=None, description="Default: $MIDDO_HOME, else $DAGSTER_HOME/middo, else ./.middo")

    def get(self) -> Storage:
        return Storage(self.root)


class ModelResource(ConfigurableResource):
    """The model being fine-tuned each round (and the self-judge)."""

    base_model: str = Field(
        default=DEFAULT_MODEL,
        description=f"'{DEFAULT_MODEL}' (packaged, offline), 'tiny-llama' (test model), a local folder or a Hugging Face id",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: DType = Field(
        default="auto", description="auto (bf16 on capable GPUs, else fp32) | float32 | bfloat16 | float16"
    )
    threads: int | None = Field(default=None, description="torch CPU threads (default: torch's choice)")
    cache_dir: str | None = Field(
        default=None, description="Converted-model cache (default ~/.cache/middo-pipeline/models)"
    )

    def base_path(self) -> str:
        return resolve_model_path(self.base_model, self.cache_dir)

    def load_kwargs(self) -> dict:
        """What ``load_model`` is given besides the path (also what each Ray worker loads with)."""
        return dict(device=self.device, dtype=self.dtype, threads=self.threads, cache_dir=self.cache_dir)

    def load(self, path: str | None = None) -> LoadedModel:
        """Load the base model, or a checkpoint folder when ``path`` is given."""
        return load_model(path or self.base_model, **self.load_kwargs())


class EvaluationResource(ConfigurableResource):
    """The held-out set, read by round_evaluation (scored on it) and refined_samples (no candidate
    may copy it); and what a round that trained a worse model than the previous one leads to, read
    by refined_samples (which then generates nothing) and optimized_dataset (which then rolls back),
    so that the steps cannot disagree. Set per run under ``resources: {evaluation: {config: ...}}``."""

    heldout_path: str = Field(
        default=str(data_file(HELDOUT)),
        description="Held-out JSONL (instruction, input, output, choices, answer_index): round_evaluation scores "
        "each round on it, and the gate rejects candidates that copy its text",
    )
    on_regression: OnRegression = Field(
        default="rollback",
        description="rollback: the next round gets the previous round's data again when this round's data trained "
        "a significantly worse model (round_evaluation); keep: merge as usual",
    )
    rollback_floor_mc_accuracy: float = Field(
        default=ROLLBACK_NOISE_FLOOR["mc_accuracy"],
        ge=0.0,
        description="Roll back on MC accuracy only when it fell by more than this (what training order alone moves it by)",
    )
    rollback_floor_response_loss: float = Field(
        default=ROLLBACK_NOISE_FLOOR["response_loss"],
        ge=0.0,
        description="Roll back on mean response loss only when it rose by more than this (nats)",
    )

    def rollback_policy(self) -> RollbackPolicy:
        floor = {"mc_accuracy": self.rollback_floor_mc_accuracy, "response_loss": self.rollback_floor_response_loss}
        return RollbackPolicy(on_regression=self.on_regression, noise_floor=floor)


class OptimizerResource(ConfigurableResource):
    """The optimizer LLM that simplifies, rewrites and extends flagged samples.

    ``backend='local'`` runs a transformers model in-process (default: the packaged SmolLM2);
    ``backend='openai'`` talks to any OpenAI-compatible server (vLLM, a hosted API). The API
    key is read from the environment variable named by ``api_key_env`` and is never logged.
    """

    backend: BackendKind = Field(default="local", description="local | openai")
    model: str = Field(default=DEFAULT_MODEL, description="local: model name/folder; openai: the served model name")
    base_url: str | None = Field(default=None, description="openai backend: e.g. http://localhost:8000/v1")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Name of the environment variable holding the API key"
    )
    max_concurrency: int = Field(default=8, description="openai backend: parallel requests")
    timeout_s: float = Field(default=120.0, description="openai backend: per-request timeout")
    max_retries: int = Field(
        default=4, description="openai backend: retries on 429/5xx/connection errors (exponential backoff)"
    )
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE,
        description="local backend: most generations per batch (requests sorted by prompt length, cut into equal batches)",
    )
    quantize: Literal["none", "int8"] = Field(
        default=DEFAULT_QUANTIZE,
        description="local backend on CPU: int8 = dynamic int8 quantization of the Linear layers (faster; its text "
        "differs a little from fp32, and is cached apart); none = the model's own weights",
    )
    engine: Literal["compact", "generate"] = Field(
        default=DEFAULT_ENGINE,
        description="local backend: compact = finished rows leave the batch (faster, same greedy text); "
        "generate = transformers' generate",
    )
    device: str = Field(default="auto", description="local backend device")
    use_cache: bool = Field(default=True, description="Cache every completion on disk so reruns resume")

    def default_style(self) -> str:
        """direct prompts (prefilled answers) suit small local models; stepwise suits strong served ones."""
        return "direct" if self.backend == "local" else "stepwise"

    def make_backend(self, storage: Storage, ray: RayComputeResource | None = None, log=None) -> LLMBackend:
        """The configured backend, behind the on-disk completion cache unless ``use_cache`` is off.
        A local backend runs on the Ray workers when ``ray`` is given and switched on."""
        from middo_pipeline.core.llm import make_backend

        if self.backend == "local":
            kwargs = dict(
                model=self.model,
                device=self.device,
                batch_size=self.batch_size,
                quantize=self.quantize,
                engine=self.engine,
            )
            if ray is not None and ray.enabled:
                from middo_pipeline.core.llm.cache import CachedBackend

                pool = ray.generation(kwargs, log=log)
                cache = storage.ensure_dir(storage.cache_dir) / "completions.sqlite" if self.use_cache else None
                return CachedBackend(pool, cache) if cache is not None else pool
        else:
            kwargs = dict(
                base_url=self.base_url,
                model=self.model,
                api_key_env=self.api_key_env,
                max_concurrency=self.max_concurrency,
                timeout=self.timeout_s,
                max_retries=self.max_retries,
            )
        cache = storage.ensure_dir(storage.cache_dir) / "completions.sqlite" if self.use_cache else None
        return make_backend(self.backend, cache=cache, **kwargs)


class RayComputeResource(RayResource):
    """Where the per-sample model work of a round runs: here (``address`` empty, the default),
    or on a Ray cluster, one model replica per worker (``core.distributed``).

    A ``dagster_ray.RayResource``: when ``address`` is set, Dagster connects (``ray.init``)
    before the step and disconnects after it, with dagster-ray's lifecycle, logging and
    ``ray_init_options``. ``address``: ``local`` starts Ray on this machine for the step (or
    joins ``$RAY_ADDRESS`` when that is set); ``auto`` joins the cluster this machine is a node
    of (``ray start``); ``ray://head:10001`` connects through the Ray client. Model and
    checkpoint folders must be readable on every node (a shared ``MIDDO_HOME``).
    """

    address: str = Field(
        default="",
        description="'' = off (one process); 'local' = Ray on this machine; 'auto' = the cluster of "
        "`ray start`; 'ray://head:10001' = a remote cluster through the Ray client",
    )
    workers: int = Field(default=0, ge=0, description="model replicas (0: as many as the cluster holds)")
    num_cpus_per_worker: float = Field(default=1.0, ge=0, description="CPUs reserved by each replica")
    num_gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per replica (1 on a GPU cluster)")
    shards_per_worker: int = Field(default=4, ge=1, description="shards per replica and pass (progress, balance)")
    max_task_retries: int = Field(default=3, ge=0, description="re-runs of a shard whose worker died")

    @property
    def enabled(self) -> bool:
        return bool(self.address.strip())

    @property
    def host(self) -> str:
        a = self.address.strip()
        if a in ("", "local", "auto"):
            return "127.0.0.1"
        return urlsplit(a if "://" in a else f"ray://{a}").hostname or a

    @property
    def name(self) -> str:
        return f"Ray cluster ({self.address.strip() or 'off'})"

    @property
    def ray_address(self) -> str | None:  # type: ignore[override]
        a = self.address.strip()
        return None if a == "local" else a

    @property
    def created(self) -> bool:
        return True  # an existing cluster (or one ray.init starts): nothing to create

    @property
    def ready(self) -> bool:
        return True

    @contextlib.contextmanager
    def yield_for_execution(self, context: InitResourceContext):
        if not self.enabled:  # off: never import or start Ray
            yield self
            return
        # nothing leaves the machine unasked: Ray's usage statistics stay off unless the user set them
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        with super().yield_for_execution(context) as r:
            yield r

    def settings(self):
        """The pool settings (``core.distributed.RaySettings``) of this resource."""
        from middo_pipeline.core.distributed import RaySettings

        return RaySettings(
            workers=self.workers,
            num_cpus=self.num_cpus_per_worker,
            num_gpus=self.num_gpus_per_worker,
            shards_per_worker=self.shards_per_worker,
            max_task_retries=self.max_task_retries,
            # fault injection for the suite: a worker crashes once in the middle of a pass
            fault_once_file=os.environ.get("MIDDO_RAY_FAULT_ONCE_FILE") or None,
        )

    def generation(self, backend_kwargs: dict, log: Callable[[str], None] | None = None):
        """A ``core.distributed.RayGeneration`` (the local LLM backend on the workers)."""
        from middo_pipeline.core.distributed import RayGeneration

        if not self.enabled:
            raise RuntimeError("the ray resource is off (address is empty)")
        return RayGeneration(backend_kwargs, self.settings(), log=log)

    def forward(self, model: ModelResource, path: str | None = None, log: Callable[[str], None] | None = None):
        """The forward passes for ``path`` (default: the base model): a ``RayForward`` on this
        cluster when enabled, else a ``LocalForward`` on the model loaded here. Use as a context
        manager; both have ``score_samples`` and ``unconditional_loss``."""
        from middo_pipeline.core.distributed import LocalForward, RayForward

        if not self.enabled:
            return LocalForward(model.load(path))
        kwargs = model.load_kwargs()
        if self.num_gpus_per_worker <= 0:
            kwargs["threads"] = None  # each worker: its own num_cpus_per_worker threads
        return RayForward(path or model.base_path(), self.settings(), kwargs, log=log)
