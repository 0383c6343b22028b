"""Instruction-following difficulty (IFD; Li et al., "From Quantity to Quality", NAACL 2024):
a quality reading that a small model can give.

IFD = loss of the response given the prompt ÷ loss of the same response with no prompt, both
mean token cross-entropies under the *base* model. A good sample's prompt explains its
response: the conditional loss is well below the unconditional one (IFD < 1). An answer the
prompt does not help explain — unrelated to it, garbled, cut off, a prompt too mangled to ask
anything — has IFD near or above 1. Unlike the self-judge, this needs no judgement from the
model, only its next-token probabilities, so it works at 135M parameters where a self-judge
is at chance (docs/decisions/quality-mode-ifd.md). Facts that are wrong in a fluent answer need knowledge the
ratio cannot supply: that stays the judge's job, with a strong model.

"No prompt" is the same chat template with an empty user turn, so both losses see the same
framing and differ only by the prompt's content.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from middo_pipeline.core.forward import ForwardResult, score_samples

__all__ = ["unconditional_loss", "ifd_scores"]


def unconditional_loss(model, tokenizer, responses: Sequence[str | None], **kwargs) -> ForwardResult:
    """Mean response cross-entropy with an empty user turn (``score_samples`` keywords pass
    through; no embeddings)."""
    kwargs.pop("with_embeddings", None)
    return score_samples(model, tokenizer, [""] * len(responses), list(responses), with_embeddings=False, **kwargs)


def ifd_scores(conditional: np.ndarray, unconditional: np.ndarray) -> np.ndarray:
    """conditional ÷ unconditional, float64; NaN where either is missing or the denominator
    is not positive."""
    c = np.asarray(conditional, dtype=np.float64)
    u = np.asarray(unconditional, dtype=np.float64)
    out = np.full(np.broadcast(c, u).shape, np.nan)
    ok = np.isfinite(c) & np.isfinite(u) & (u > 0)
    np.divide(c, u, out=out, where=ok)
    return out
