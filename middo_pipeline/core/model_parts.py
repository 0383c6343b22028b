"""Where a transformers model keeps the parts the forward pass reads: the decoder and output
head (through a PEFT wrapper), the text config, the logit transform applied after the head, the
decoder layers; and eval mode for the length of a pass.

Part of the readouts' and evaluation's source digest (``checkpoints.source_digest``): the head
transform decides the loss values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch


def unwrap(model):
    """A PEFT wrapper's underlying transformers model (its LoRA layers stay in place)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def decoder_and_head(model):
    """(decoder, lm_head) for the fast path, or (None, None) when the model does not expose them."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = None
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except Exception:  # noqa: BLE001 - exotic models raise here
            decoder = None
    if decoder is None or decoder is model:
        base = getattr(model, "base_model", None)
        decoder = base if base is not None and base is not model else None
    if decoder is None or head is None:
        return None, None
    return decoder, head


def text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:  # noqa: BLE001
            return cfg
    return cfg


def head_transform(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logit post-processing the model class applies after its lm_head (float32 logits in)."""
    cfg = text_config(model)
    top = getattr(model, "config", None)
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    scale = getattr(model, "logit_scale", None)  # Cohere keeps it on the module
    if scale is None:
        scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        steps.append(lambda x, s=float(scale): x * s)
    div = getattr(cfg, "logits_scaling", None) or getattr(top, "logits_scaling", None)
    if isinstance(div, (int, float)) and div not in (0, 1):
        steps.append(lambda x, d=float(div): x / d)
    cap = getattr(cfg, "final_logit_softcapping", None) or getattr(top, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap > 0:
        steps.append(lambda x, c=float(cap): torch.tanh(x / c) * c)

    def apply(x: torch.Tensor) -> torch.Tensor:
        for f in steps:
            x = f(x)
        return x

    return apply


def last_hidden(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    return out[0]


@contextmanager
def eval_mode(model):
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def decoder_layers(decoder) -> Sequence | None:
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None
