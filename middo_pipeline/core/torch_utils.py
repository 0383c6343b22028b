"""Small torch helpers shared by the forward-pass modules (``forward``, ``quality``)."""

from __future__ import annotations

import inspect

import torch


def model_device(model) -> torch.device:
    """The device of a model's input embeddings (where its input ids must go), else of its
    first parameter."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# transformers ≤ 5.23 calls the KV-cache argument (and output field) ``past_key_values``; 5.24
# renamed both to ``cache`` (the old name still works there, with a deprecation warning, until
# 5.40). Probe both spellings, newest first, so neither release loses a cached path.
_CACHE_NAMES = ("cache", "past_key_values")


def cache_param(model) -> str | None:
    """The name under which ``model.forward`` takes a past KV cache, or None."""
    return next((name for name in _CACHE_NAMES if _accepts(model, name)), None)


def _returned_cache(out):
    """The KV cache a forward pass returned, under either name."""
    for name in _CACHE_NAMES:
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None
