"""How the scores 0..10 are spelled in token ids after the judge prompt and its prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from middo_pipeline.core.quality.prompts import DEFAULT_PREFILL, _encode, _render, judge_messages


@dataclass(frozen=True)
class ScoreTokens:
    """How the scores 0..10 are spelled in token ids right after the prompt (+ prefill)."""

    prefill: str  # the prefill to use (may differ from the requested one in trailing whitespace)
    digit_ids: tuple[int, ...]  # token id of "0".."9" (as they appear after the prefill)
    ten_id: int | None  # single-token "10", when the tokenizer has one
    one_id: int | None  # two-token "10": the first token ("1") ...
    zero_id: int | None  # ... and the token that follows it ("0")

    @property
    def two_step_ten(self) -> bool:
        return self.ten_id is None


def _tail(base: list[int], full: list[int]) -> list[int] | None:
    if len(full) <= len(base) or full[: len(base)] != base:
        return None
    return full[len(base) :]


def find_score_tokens(tokenizer, prefill: str = DEFAULT_PREFILL) -> ScoreTokens | None:
    """Find the token ids of the scores after ``prefill`` by tokenizing a rendered judge
    prompt with and without each score appended. Tries the prefill as given, then (when a
    tokenizer glues a space to the digit, as "Ġ7") the prefill without its trailing space and
    the digits with a leading space. None when no spelling works."""
    context = _render(tokenizer, judge_messages("clarity", "Name a primary colour.", "Red."), "")
    variants = [(prefill, "")]
    if prefill != prefill.rstrip():
        variants.append((prefill.rstrip(), prefill[len(prefill.rstrip()) :]))
    else:
        variants.append((prefill, " "))
    for pre, sep in variants:
        base = _encode(tokenizer, context + pre)
        digits = []
        for d in range(10):
            tail = _tail(base, _encode(tokenizer, context + pre + sep + str(d)))
            if tail is None or len(tail) != 1:
                break
            digits.append(tail[0])
        if len(digits) != 10 or len(set(digits)) != 10:
            continue
        # in the second variant the space belongs to the digit tokens ("Ġ7"), so the prompt
        # ends with the stripped prefill
        tail10 = _tail(base, _encode(tokenizer, context + pre + sep + "10"))
        if tail10 is None:
            continue
        if len(tail10) == 1 and tail10[0] not in digits:
            return ScoreTokens(pre, tuple(digits), ten_id=tail10[0], one_id=None, zero_id=None)
        if len(tail10) == 2 and tail10[0] == digits[1]:
            return ScoreTokens(pre, tuple(digits), ten_id=None, one_id=digits[1], zero_id=tail10[1])
    return None


def _score_probs(first: torch.Tensor, second: torch.Tensor | None, st: ScoreTokens, min_mass: float):
    """(B, V) log-probs at the score position (+ at the position after "1") -> expected scores (B,)."""
    p_first = first.exp()
    digits = p_first[:, list(st.digit_ids)]  # (B, 10)
    if st.ten_id is not None:
        p10 = p_first[:, st.ten_id]
        mass = digits.sum(dim=1) + p10
        probs = torch.cat([digits, p10[:, None]], dim=1)
    else:
        q = second.exp()[:, st.zero_id]  # P("0" | "1")
        mass = digits.sum(dim=1)
        p1 = digits[:, 1]
        probs = torch.cat([digits[:, :1], (p1 * (1 - q))[:, None], digits[:, 2:], (p1 * q)[:, None]], dim=1)
    total = probs.sum(dim=1)
    scores = (probs * torch.arange(11, dtype=probs.dtype, device=probs.device)).sum(dim=1) / total.clamp_min(1e-30)
    scores = torch.where((mass >= min_mass) & (total > 0), scores, torch.full_like(scores, float("nan")))
    return scores, mass
