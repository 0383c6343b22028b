"""The one place that loads models: the packaged default, Hugging Face ids, local paths,
and the tiny test model."""

from middo_pipeline.models.loading import (
    DEFAULT_MODEL,
    TINY_MODEL,
    LoadedModel,
    load_model,
    resolve_model_path,
)

__all__ = ["DEFAULT_MODEL", "TINY_MODEL", "LoadedModel", "load_model", "resolve_model_path"]
