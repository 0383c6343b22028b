"""Generated scores: a judge ``LLMBackend`` writes a short answer and ``parse_score`` reads
the first number 0–10 in it."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from middo_pipeline.core.llm.protocol import ChatRequest
from middo_pipeline.core.quality.prompts import DEFAULT_PREFILL, TRUNCATION_MARK, judgement_messages

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

_NUMBER = re.compile(r"(?<![\w.])(?P<value>-?\d+(?:\.\d+)?)(?P<per100>\s*%|\s*/\s*100(?!\d|\.\d))?")


def parse_score(text: str | None) -> float | None:
    """The first number in ``text`` when it is within 0..10 ("Score: 7/10" -> 7, "**8**" -> 8,
    "7." -> 7, "6.5" -> 6.5); a percentage or a score out of 100 is rescaled ("95%" -> 9.5,
    "85/100" -> 8.5: small judges often answer that way). None when there is no number or the
    first one is out of range."""
    if not text:
        return None
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group("value"))
    if match.group("per100"):
        value /= 10.0
    if not (0.0 <= value <= 10.0) or math.isnan(value):
        return None
    return value


def _clip_chars(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars].rstrip() + TRUNCATION_MARK


def generated_scores(
    backend,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_tokens: int = 8,
    progress: Progress | None = None,
    prefill: str = DEFAULT_PREFILL,
    max_chars: int = 8000,
) -> np.ndarray:
    """Scores written by a judge ``LLMBackend`` and parsed: float64 (N, 6) in ``COLUMNS``
    order. Failed requests and unparseable answers are NaN (never 0). Greedy, short answers
    (``max_tokens``) after the ``prefill``."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    n = len(prompts)
    out = np.full((n, 6), np.nan, dtype=np.float64)
    if n == 0:
        return out
    requests = []
    for prompt, response in zip(prompts, responses):
        p = _clip_chars(prompt or "", max_chars)
        r = _clip_chars(response or "", max_chars)
        for messages in judgement_messages(p, r):
            requests.append(
                ChatRequest.from_messages(messages, max_tokens=max_tokens, temperature=0.0, prefill=prefill)
            )
    completions = backend.complete(requests, progress=progress)
    if len(completions) != len(requests):
        raise RuntimeError(f"the judge backend returned {len(completions)} completions for {len(requests)} requests")
    flat = out.reshape(-1)
    n_failed = n_unparsed = 0
    for i, c in enumerate(completions):
        if c is None or not c.ok:
            n_failed += 1
            continue
        value = parse_score(c.text)
        if value is None:
            n_unparsed += 1
            continue
        flat[i] = value
    if n_failed or n_unparsed:
        log.info(
            "judge: %d failed and %d unparseable answers of %d, recorded as missing",
            n_failed,
            n_unparsed,
            len(requests),
        )
    return out
