"""Dagster resources: where files live, which model is trained and judged, which LLM optimizes.

Each is a thin configurable wrapper over a plain module in ``middo_pipeline.core`` or
``middo_pipeline.models``; swapping the laptop default for a GPU model or a vLLM server is a
matter of resource config (see README "Scaling up").
"""

from __future__ import annotations

from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from middo_pipeline.core.llm import BackendKind
from middo_pipeline.core.llm.local import DEFAULT_BATCH_SIZE, DEFAULT_QUANTIZE
from middo_pipeline.core.llm.protocol import LLMBackend
from middo_pipeline.core.storage import Storage
from middo_pipeline.models.loading import DEFAULT_MODEL, DType, LoadedModel, load_model, resolve_model_path


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

    def load(self, path: str | None = None) -> LoadedModel:
        """Load the base model, or a checkpoint folder when ``path`` is given."""
        return load_model(
            path or self.base_model,
            device=self.device,
            dtype=self.dtype,
            threads=self.threads,
            cache_dir=self.cache_dir,
        )


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
        default=DEFAULT_BATCH_SIZE, description="local backend: generations per batch (sorted by prompt length)"
    )
    quantize: Literal["none", "int8"] = Field(
        default=DEFAULT_QUANTIZE,
        description="local backend on CPU: int8 = dynamic int8 quantization of the Linear layers (faster; its text "
        "differs a little from fp32, and is cached apart); none = the model's own weights",
    )
    device: str = Field(default="auto", description="local backend device")
    use_cache: bool = Field(default=True, description="Cache every completion on disk so reruns resume")

    def default_style(self) -> str:
        """direct prompts (prefilled answers) suit small local models; stepwise suits strong served ones."""
        return "direct" if self.backend == "local" else "stepwise"

    def make_backend(self, storage: Storage) -> LLMBackend:
        """The configured backend, behind the on-disk completion cache unless ``use_cache`` is off."""
        from middo_pipeline.core.llm import make_backend

        if self.backend == "local":
            kwargs = dict(model=self.model, device=self.device, batch_size=self.batch_size, quantize=self.quantize)
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
