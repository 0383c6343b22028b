"""Small torch helpers shared by the forward-pass modules (``forward``, ``quality``)."""

from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    """The device of a model's input embeddings (where its input ids must go), else of its
    first parameter."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device
