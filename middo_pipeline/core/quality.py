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

No dagster imports here.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from middo_pipeline.core.optimizer.llm import ChatRequest

log = logging.getLogger(__name__)

__all__ = [
    "DIMENSIONS",
    "VIEWS",
    "COLUMNS",
    "DEFAULT_PREFILL",
    "judge_messages",
    "judgement_messages",
    "ScoreTokens",
    "find_score_tokens",
    "expected_scores",
    "parse_score",
    "generated_scores",
    "combine_scores",
]

DIMENSIONS = ("factuality", "clarity", "completeness")
VIEWS = ("prompt", "full")
COLUMNS = tuple(f"{d}_{v}" for v in VIEWS for d in DIMENSIONS)  # the (N, 6) column order
DEFAULT_PREFILL = "Score: "
DEFAULT_MIN_MASS = 1e-4
TRUNCATION_MARK = " […]"

Progress = Callable[[int, int], None]

# The judge prompt is laid out so that everything that does not depend on the sample comes
# first (one KV cache serves every judgement, see ``expected_scores``), then the sample, then
# the one criterion of this judgement, then the request for a number.
_INTRO = (
    "You are rating one sample from a dataset used to fine-tune an AI assistant. Read the sample, "
    "then rate it on the single criterion stated after it, from 0 (very poor) to 10 (excellent)."
)
# what each judgement asks: (dimension, view) -> criterion
_CRITERIA = {
    ("factuality", "prompt"): (
        "FACTUALITY of the instruction: are the facts, premises and assumptions it states correct? "
        "An instruction that assumes nothing false deserves a high score."
    ),
    ("clarity", "prompt"): (
        "CLARITY of the instruction: is it unambiguous and well written, so that it is clear what is asked?"
    ),
    ("completeness", "prompt"): (
        "COMPLETENESS of the instruction: does it give all the information and context needed to answer it well?"
    ),
    ("factuality", "full"): (
        "FACTUALITY of the response: is everything it states correct, with no false facts, wrong "
        "calculations or invented details?"
    ),
    ("clarity", "full"): "CLARITY of the response: is it well organised, precise and easy to follow?",
    ("completeness", "full"): "COMPLETENESS of the response: does it fully address every part of the instruction?",
}
_ASK = "Reply with a single integer from 0 to 10 and nothing else."


def judge_messages(dimension: str, prompt: str, response: str | None) -> list[dict]:
    """The chat messages of one judgement (one user message, no system message).

    ``response=None`` is the prompt-alone view (the response is not shown)."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; expected one of {DIMENSIONS}")
    view = "prompt" if response is None else "full"
    parts = [_INTRO, "", "[Instruction]", prompt]
    if response is not None:
        parts += ["", "[Response]", response]
    parts += ["", f"Criterion: {_CRITERIA[(dimension, view)]}", _ASK]
    return [{"role": "user", "content": "\n".join(parts)}]


def judgement_messages(prompt: str, response: str) -> list[list[dict]]:
    """The 6 judgements of one sample, in ``COLUMNS`` order."""
    return [judge_messages(d, prompt, None) for d in DIMENSIONS] + [
        judge_messages(d, prompt, response) for d in DIMENSIONS
    ]


def _render(tokenizer, messages: list[dict], prefill: str) -> str:
    """Chat template with the assistant generation prompt, then the prefill."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model without a template: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant: "
    return text + prefill


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------
# score tokens


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
    return full[len(base):]


def find_score_tokens(tokenizer, prefill: str = DEFAULT_PREFILL) -> ScoreTokens | None:
    """Find the token ids of the scores after ``prefill`` by tokenizing a rendered judge
    prompt with and without each score appended. Tries the prefill as given, then (when a
    tokenizer glues a space to the digit, as "Ġ7") the prefill without its trailing space and
    the digits with a leading space. None when no spelling works."""
    context = _render(tokenizer, judge_messages("clarity", "Name a primary colour.", "Red."), "")
    variants = [(prefill, "")]
    if prefill != prefill.rstrip():
        variants.append((prefill.rstrip(), prefill[len(prefill.rstrip()):]))
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


# ----------------------------------------------------------------------------------------------
# expected scores


def _model_device(model) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _cut(tokenizer, ids: list[int], n: int) -> str:
    return tokenizer.decode(ids[: max(n, 0)], skip_special_tokens=True).rstrip() + TRUNCATION_MARK


def _fit_texts(tokenizer, prompt_ids, response_ids, prompt, response, budget: int) -> tuple[str, str | None]:
    """Shorten prompt/response (token-wise) so that together they take at most ``budget``
    tokens; each keeps at least half of the budget when it needs it."""
    lp = len(prompt_ids)
    lr = 0 if response_ids is None else len(response_ids)
    if lp + lr <= budget:
        return prompt, response
    if response_ids is None:
        return _cut(tokenizer, prompt_ids, budget), None
    half = budget // 2
    if lp <= half:
        np_, nr = lp, budget - lp
    elif lr <= half:
        np_, nr = budget - lr, lr
    else:
        np_, nr = half, budget - half
    p = prompt if np_ >= lp else _cut(tokenizer, prompt_ids, np_)
    r = response if nr >= lr else _cut(tokenizer, response_ids, nr)
    return p, r


def _build_sequences(tokenizer, prompts, responses, prefill: str, max_length: int) -> list[list[int]]:
    """Token ids of the 6N judge prompts (sample-major, ``COLUMNS`` order), each ≤ max_length − 1
    (one position is left for the teacher-forced token)."""
    limit = max_length - 1
    # framing cost of each judgement kind, with empty contents
    overhead = {}
    for d in DIMENSIONS:
        overhead[(d, "prompt")] = len(_encode(tokenizer, _render(tokenizer, judge_messages(d, "", None), prefill)))
        overhead[(d, "full")] = len(_encode(tokenizer, _render(tokenizer, judge_messages(d, "", ""), prefill)))
    margin = 8  # re-tokenising cut text and the truncation mark can cost a few tokens
    worst = max(overhead.values())
    if limit - worst - margin < 16:
        raise ValueError(
            f"max_length={max_length} is too short: the judge prompt framing alone takes {worst} tokens "
            f"with this tokenizer; use at least {worst + margin + 17}"
        )
    seqs: list[list[int]] = []
    n_cut = 0
    for prompt, response in zip(prompts, responses):
        prompt = prompt or ""
        response = response or ""
        p_ids = _encode(tokenizer, prompt)
        r_ids = _encode(tokenizer, response)
        for view in VIEWS:
            for d in DIMENSIONS:
                budget = limit - overhead[(d, view)] - margin
                p, r = _fit_texts(tokenizer, p_ids, r_ids if view == "full" else None, prompt,
                                  response if view == "full" else None, budget)
                ids = _encode(tokenizer, _render(tokenizer, judge_messages(d, p, r), prefill))
                if len(ids) > limit:  # last resort: keep the end (the question and the prefill)
                    ids = ids[-limit:]
                    n_cut += 1
                seqs.append(ids)
    if n_cut:
        log.warning("%d judge prompts were cut from the left to fit max_length=%d", n_cut, max_length)
    return seqs


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


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all sequences (each keeps >= 1 own token)."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(x) for x in seqs) - 1
    for x in seqs[1:]:
        i = 0
        while i < n and x[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return max(n, 0)


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class _Reader:
    """Runs batches of judge prompts and reads the score distribution at each one's end."""

    def __init__(self, model, st: ScoreTokens, pad_id: int, min_mass: float):
        self.model, self.st, self.pad_id, self.min_mass = model, st, pad_id, min_mass
        self.device = _model_device(model)
        self.use_keep = _accepts(model, "logits_to_keep")
        self.extra = [st.one_id] if st.two_step_ten else []
        self.prefix_cache = None
        self.prefix_len = 0

    def set_prefix(self, prefix: list[int]) -> None:
        """Run the shared prefix once; its KV cache is reused (copied) by every batch."""
        out = self.model(input_ids=torch.tensor([prefix], dtype=torch.long, device=self.device), use_cache=True)
        cache = getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            raise TypeError("the model returned no usable KV cache")
        self.prefix_cache, self.prefix_len = cache, len(prefix)

    def run(self, suffixes: list[list[int]], with_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and score-token mass for one batch: token lists after the shared prefix
        (``with_prefix``), or whole prompts."""
        prefix_len = self.prefix_len if with_prefix else 0
        rows = [x + self.extra for x in suffixes]
        lengths = [len(x) for x in suffixes]  # the score is predicted at position length − 1
        b, width = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((b, prefix_len + width), dtype=torch.long)
        attn[:, :prefix_len] = 1
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            attn[j, prefix_len: prefix_len + len(r)] = 1
        kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": attn.to(self.device)}
        if with_prefix:
            cache = copy.deepcopy(self.prefix_cache)
            cache.batch_repeat_interleave(b)
            kwargs.update(past_key_values=cache, use_cache=True)
        first_pos = [L - 1 for L in lengths]
        second_pos = lengths if self.extra else []
        wanted = sorted(set(first_pos) | set(second_pos))
        if self.use_keep:
            logits = self.model(**kwargs, logits_to_keep=torch.tensor(wanted, dtype=torch.long, device=self.device)).logits
            col = {p: c for c, p in enumerate(wanted)}
        else:
            logits = self.model(**kwargs).logits
            col = {p: p for p in wanted}
        ar = torch.arange(b, device=logits.device)
        first = torch.log_softmax(logits[ar, torch.tensor([col[p] for p in first_pos], device=logits.device)].float(), -1)
        second = None
        if self.extra:
            second = torch.log_softmax(logits[ar, torch.tensor([col[p] for p in second_pos], device=logits.device)].float(), -1)
        return _score_probs(first, second, self.st, self.min_mass)


def expected_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int = 512,
    max_batch_size: int = 16,
    progress: Progress | None = None,
    prefill: str = DEFAULT_PREFILL,
    min_mass: float = DEFAULT_MIN_MASS,
    share_prefix: bool = True,
    return_mass: bool = False,
):
    """Expected 0–10 scores, float64 (N, 6) in ``COLUMNS`` order; NaN = missing.

    Judge prompts are sorted by length and run ``max_batch_size`` at a time, right-padded with
    an attention mask; each sequence's scores are read at its own last positions. Samples too
    long for ``max_length`` tokens are shortened (response and prompt, from their ends).

    With ``share_prefix`` (default) the token prefix common to all judge prompts (the chat
    template's opening, a default system prompt, the judge's instructions) runs once and its
    KV cache is reused by every batch, for models that take ``past_key_values`` (transformers
    causal LMs); otherwise, or if that fails, every prompt runs whole. Both give the same
    scores up to float rounding.

    ``progress(done, total)`` counts judgements. With ``return_mass=True`` also returns the
    (N, 6) probability mass that fell on the score tokens."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    n = len(prompts)
    out = np.full((n, 6), np.nan, dtype=np.float64)
    mass_out = np.zeros((n, 6), dtype=np.float64)
    if n == 0:
        return (out, mass_out) if return_mass else out
    st = find_score_tokens(tokenizer, prefill)
    if st is None:
        log.warning("the score tokens 0..10 cannot be found in this tokenizer: all quality judgements are missing")
        if progress:
            progress(6 * n, 6 * n)
        return (out, mass_out) if return_mass else out
    seqs = _build_sequences(tokenizer, prompts, responses, st.prefill, max_length)
    total = len(seqs)
    flat = np.full(total, np.nan, dtype=np.float64)
    flat_mass = np.zeros(total, dtype=np.float64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    reader = _Reader(model, st, pad_id, min_mass)
    was_training = getattr(model, "training", False)
    model.eval()
    done = 0
    try:
        with torch.inference_mode():
            prefix: list[int] = []
            if share_prefix and _accepts(model, "past_key_values"):
                # the template's part that no sample changes: common to judge prompts of two
                # made-up samples (every real prompt is then checked token by token)
                ref = _build_sequences(tokenizer, ["a b", "c"], ["d", "e f"], st.prefill, max_length)
                prefix = ref[0][: _common_prefix(ref)]
            if len(prefix) >= 8:
                try:
                    reader.set_prefix(prefix)
                except Exception as exc:  # noqa: BLE001 - any model without a usable cache: run whole prompts
                    log.warning("shared-prefix cache unavailable (%s: %s); running whole judge prompts",
                                type(exc).__name__, exc)
                    prefix = []
            else:
                prefix = []
            p = len(prefix)
            shared = [bool(p) and len(x) > p and x[:p] == prefix for x in seqs]
            for group in (True, False):  # prompts that start with the prefix, then any others
                members = [i for i in range(total) if shared[i] == group]
                order = sorted(members, key=lambda i: (-len(seqs[i]), i))
                for b0 in range(0, len(order), max_batch_size):
                    batch = order[b0: b0 + max_batch_size]
                    scores, mass = reader.run([seqs[i][p:] if group else seqs[i] for i in batch], with_prefix=group)
                    flat[batch] = scores.cpu().double().numpy()
                    flat_mass[batch] = mass.cpu().double().numpy()
                    done += len(batch)
                    if progress:
                        progress(done, total)
    finally:
        if was_training:
            model.train()
    out[:] = flat.reshape(n, 6)
    mass_out[:] = flat_mass.reshape(n, 6)
    n_low = int(np.isnan(out).sum())
    if n_low:
        log.info("%d of %d judgements had < %g probability on the score tokens: recorded as missing",
                 n_low, total, min_mass)
    return (out, mass_out) if return_mass else out


# ----------------------------------------------------------------------------------------------
# generated scores

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def parse_score(text: str | None) -> float | None:
    """The first number in ``text`` when it is within 0..10 ("Score: 7/10" -> 7, "**8**" -> 8,
    "7." -> 7, "6.5" -> 6.5); None when there is no number or the first one is out of range."""
    if not text:
        return None
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group(0))
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
            requests.append(ChatRequest.from_messages(messages, max_tokens=max_tokens, temperature=0.0, prefill=prefill))
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
        log.info("judge: %d failed and %d unparseable answers of %d, recorded as missing",
                 n_failed, n_unparsed, len(requests))
    return out


# ----------------------------------------------------------------------------------------------


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
