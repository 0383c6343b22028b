"""The quality signal: the model judges each sample (self-alignment score).

Six judgements per sample: three dimensions (factuality, clarity, completeness) × two views
(the prompt alone, the prompt + response), each on a 0–10 scale. Column order of the (N, 6)
arrays: ``[factuality_prompt, clarity_prompt, completeness_prompt, factuality_full,
clarity_full, completeness_full]``.

Two ways to get a score:

- ``expected_scores`` (cheap, smooth): ONE forward pass per judgement. The judge prompt ends
  with the assistant generation prompt and the prefill ``"Score: "``, so the next token is the
  score. The next-token probabilities over the score tokens give a distribution over 0..10 and
  the expected value is the score. When "10" is two tokens ("1", "0") the token "1" is
  teacher-forced after the prompt in the same sequence: the last prompt position gives
  P(first digit), the next position gives P("0" | "1"); then P(1) = P("1")·(1 − P("0"|"1")),
  P(10) = P("1")·P("0"|"1"). The 11 probabilities are renormalised. A judgement is missing
  (NaN), never 0, when the score tokens cannot be found in the tokenizer or the probability
  mass on them is below ``min_mass``.
- ``generated_scores``: the judge (any ``LLMBackend``) writes a short answer and
  ``parse_score`` takes the first number 0–10; failures and unparseable answers are NaN.

Modules: ``prompts`` (the judge prompts and their token sequences), ``tokens`` (the score
tokens), ``expected`` (the forward-pass readers and ``expected_scores``), ``generated``
(``generated_scores``, ``parse_score``); the combination of the six judgements is here.
"""

from __future__ import annotations

import numpy as np

# the private names re-exported here (``x as x``) are the ones the tests reach for
from middo_pipeline.core.quality.expected import (
    DEFAULT_MIN_MASS,
    _Reader as _Reader,
    _returned_cache as _returned_cache,
    cache_param,
    expected_scores,
)
from middo_pipeline.core.quality.generated import generated_scores, parse_score
from middo_pipeline.core.quality.packed import (
    _packed_supported as _packed_supported,
    _PackedReader as _PackedReader,
    packed_unsupported_reason,
)
from middo_pipeline.core.quality.prompts import (
    COLUMNS,
    DEFAULT_PREFILL,
    DIMENSIONS,
    TRUNCATION_MARK,
    VIEWS,
    _build_sequences as _build_sequences,
    _encode as _encode,
    _render as _render,
    judge_messages,
    judgement_messages,
)
from middo_pipeline.core.quality.tokens import ScoreTokens, find_score_tokens

__all__ = [
    "DIMENSIONS",
    "VIEWS",
    "COLUMNS",
    "DEFAULT_PREFILL",
    "DEFAULT_MIN_MASS",
    "TRUNCATION_MARK",
    "judge_messages",
    "judgement_messages",
    "ScoreTokens",
    "find_score_tokens",
    "expected_scores",
    "cache_param",
    "packed_unsupported_reason",
    "parse_score",
    "generated_scores",
    "combine_scores",
]


def combine_scores(scores6: np.ndarray) -> dict[str, np.ndarray]:
    """Per dimension the mean of its prompt-only and full judgements (NaN only when both are
    missing); ``quality_score`` = mean of the available dimensions; ``n_missing`` per sample."""
    s = np.asarray(scores6, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 6:
        raise ValueError(f"scores must be (N, 6), got shape {s.shape}")

    def nanmean(a: np.ndarray) -> np.ndarray:
        valid = ~np.isnan(a)
        count = valid.sum(axis=1)
        total = np.where(valid, a, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    out: dict[str, np.ndarray] = {}
    for j, d in enumerate(DIMENSIONS):
        out[d] = nanmean(s[:, [j, 3 + j]])
    out["quality_score"] = nanmean(np.stack([out[d] for d in DIMENSIONS], axis=1))
    out["n_missing"] = np.isnan(s).sum(axis=1).astype(np.int64)
    return out
