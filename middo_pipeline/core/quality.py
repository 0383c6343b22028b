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
    "cache_param",
    "packed_unsupported_reason",
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

# The judge prompt is laid out for sharing work between judgements (see ``expected_scores``):
#   [framing: template opening, system prompt, _INTRO with the rubric of all three criteria]
#   [the sample: "[Instruction]" + prompt, then (full view only) "[Response]" + response]
#   [the question of this judgement: one criterion, one view] [end of turn, prefill]
# The framing is the same for every judgement; the sample part of the prompt-alone view is a
# prefix of the full view's; only the short question differs between the dimensions.
_INTRO = (
    "Rate one sample of an AI assistant's training data (an instruction, sometimes followed by a response) "
    "on the single criterion asked after it, from 0 (very poor) to 10 (excellent). Reply with the number only.\n"
    "FACTUALITY: 10 = every fact, premise and calculation is correct; 0 = mostly false or invented.\n"
    "CLARITY: 10 = unambiguous, precise and easy to follow; 0 = impossible to understand.\n"
    "COMPLETENESS: 10 = an instruction gives all the information needed to answer it, a response covers "
    "every part of its instruction; 0 = most of what is needed is missing."
)
# what each judgement asks: (dimension, view) -> question (the last line of the user message)
_QUESTIONS = {
    (d, v): f"Rate the {d.upper()} of the {'instruction' if v == 'prompt' else 'response'}."
    for d in DIMENSIONS
    for v in VIEWS
}


def judge_messages(dimension: str, prompt: str, response: str | None) -> list[dict]:
    """The chat messages of one judgement (one user message, no system message).

    ``response=None`` is the prompt-alone view (the response is not shown)."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; expected one of {DIMENSIONS}")
    view = "prompt" if response is None else "full"
    parts = [_INTRO, "", "[Instruction]", prompt]
    if response is not None:
        parts += ["", "[Response]", response]
    parts += ["", _QUESTIONS[(dimension, view)]]
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
    tokens; each keeps at least half of the budget when it needs it. A cut text is re-encoded
    (with its truncation mark it can take more tokens than it was cut to): the cut is repeated
    with a smaller budget while it does not fit."""
    target = budget
    for _ in range(4):
        p, r = _fit_once(tokenizer, prompt_ids, response_ids, prompt, response, target)
        used = len(_encode(tokenizer, p)) + (0 if r is None else len(_encode(tokenizer, r)))
        if used <= budget or target <= 2:
            break
        target = max(target - (used - budget), 2)
    return p, r


def _fit_once(tokenizer, prompt_ids, response_ids, prompt, response, budget: int) -> tuple[str, str | None]:
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
    # one shortening per sample, shared by its 6 judgements: the prompt-alone view shows the same
    # (possibly shortened) instruction as the full view, so its token sequence starts like the
    # full view's (the shared path in ``expected_scores`` relies on it; the result is the same)
    budget = limit - worst - margin
    seqs: list[list[int]] = []
    n_cut = 0
    for prompt, response in zip(prompts, responses):
        prompt = prompt or ""
        response = response or ""
        p, r = _fit_texts(tokenizer, _encode(tokenizer, prompt), _encode(tokenizer, response), prompt, response,
                          budget)
        for view in VIEWS:
            for d in DIMENSIONS:
                ids = _encode(tokenizer, _render(tokenizer, judge_messages(d, p, r if view == "full" else None), prefill))
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


# transformers ≤ 5.23 calls the KV-cache argument (and output field) ``past_key_values``; 5.24
# renamed both to ``cache`` (the old name still works there, with a deprecation warning, until
# 5.40). Probe both spellings, newest first, so neither release loses the shared-prefix path.
_CACHE_NAMES = ("cache", "past_key_values")


def cache_param(model) -> str | None:
    """The name under which ``model.forward`` takes a past KV cache, or None."""
    return next((name for name in _CACHE_NAMES if _accepts(model, name)), None)


def _returned_cache(out):
    for name in _CACHE_NAMES:
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


class _Reader:
    """Runs batches of judge prompts and reads the score distribution at each one's end."""

    def __init__(self, model, st: ScoreTokens, pad_id: int, min_mass: float):
        self.model, self.st, self.pad_id, self.min_mass = model, st, pad_id, min_mass
        self.device = _model_device(model)
        self.use_keep = _accepts(model, "logits_to_keep")
        self.extra = [st.one_id] if st.two_step_ten else []
        self.prefix_cache = None
        self.prefix_len = 0
        self.cache_name = cache_param(model)

    def set_prefix(self, prefix: list[int]) -> None:
        """Run the shared prefix once; its KV cache is reused (copied) by every batch."""
        out = self.model(input_ids=torch.tensor([prefix], dtype=torch.long, device=self.device), use_cache=True)
        cache = _returned_cache(out)
        if self.cache_name is None or cache is None or not hasattr(cache, "batch_repeat_interleave"):
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
            kwargs.update({self.cache_name: cache, "use_cache": True})
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


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Packed:
    """One sample laid out for the shared path: the tokens after the common framing up to the
    end of the full view's shared part (``content``), where the prompt-alone view branches off
    (``branch``, an offset into ``content``), and the 6 judgements' own tails (``COLUMNS``
    order), each continuing its view's branch point (``bases``)."""

    index: int  # the sample's row in the output
    content: list[int]
    branch: int
    suffixes: list[list[int]]
    bases: list[int]


def _plan_sample(index: int, seqs6: list[list[int]], prefix_len: int) -> _Packed | None:
    """Split the 6 judge prompts of one sample into content + branch points + tails; None when
    they do not all start with the framing (e.g. cut from the left)."""
    full = seqs6[3:]
    # P: shared by all 6 (framing + instruction); F: shared by the 3 full-view ones (+ response).
    # Each judgement keeps at least one token of its own, where its score is read.
    p = min(min(_lcp(seqs6[0], x) for x in seqs6[1:]), min(len(x) for x in seqs6) - 1)
    f = min(min(_lcp(full[0], x) for x in full[1:]), min(len(x) for x in full) - 1)
    if p < prefix_len or f < p:
        return None
    content = full[0][prefix_len:f]
    suffixes = [x[p:] for x in seqs6[:3]] + [x[f:] for x in full]
    bases = [p - prefix_len] * 3 + [f - prefix_len] * 3
    return _Packed(index, content, p - prefix_len, suffixes, bases)


def _packed_supported(model) -> bool:
    """The shared path needs a transformers-style causal LM: explicit positions, a custom 4D
    additive attention mask (honoured by the eager and sdpa attention implementations), a past
    KV cache and ``logits_to_keep``."""
    return packed_unsupported_reason(model) is None


def packed_unsupported_reason(model) -> str | None:
    """Why the shared (packed) judge path cannot run on ``model``; None when it can."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        return f"attention implementation {impl!r} takes no custom 4D mask (needs eager or sdpa)"
    missing = [name for name in ("attention_mask", "position_ids", "logits_to_keep") if not _accepts(model, name)]
    if cache_param(model) is None:
        missing.append(" or ".join(_CACHE_NAMES))
    if missing:
        return f"{type(model).__name__}.forward takes no {', '.join(missing)}"
    return None


class _PackedReader:
    """Runs the 6 judgements of several samples in one forward pass per batch.

    Each batch row is one sample, packed as ``[content | tail_1 | … | tail_6]`` after the shared
    framing (its KV cache, ``prefix_cache``, is reused). A 4D attention mask makes every token see
    exactly what it sees in its own judge prompt: content tokens attend causally to the framing
    and the content; a judgement's tail attends to the framing, to the content up to its view's
    branch point (the end of the instruction for the prompt-alone view, so it never sees the
    response; the end of the response for the full view) and causally to itself, never to the
    other tails. Position ids continue from the branch point, so each score is computed from the
    same keys, values and positions as in a separate forward pass over its whole judge prompt.

    Tails are right-aligned in per-judgement slots of equal width across the batch, so the
    score positions are the same columns in every row (``logits_to_keep``)."""

    def __init__(self, model, st: ScoreTokens, pad_id: int, min_mass: float, prefix_cache, prefix_len: int):
        self.model, self.st, self.pad_id, self.min_mass = model, st, pad_id, min_mass
        self.prefix_cache, self.prefix_len = prefix_cache, prefix_len
        self.device = _model_device(model)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        self.dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        self.extra = [st.one_id] if st.two_step_ten else []
        self.cache_name = cache_param(model)

    def run(self, items: list[_Packed]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and score-token mass, (B, 6) each."""
        g, extra = self.prefix_len, self.extra
        b = len(items)
        width = max(len(it.content) for it in items)
        slots = [max(len(it.suffixes[j]) + len(extra) for it in items) for j in range(6)]
        q = width + sum(slots)
        input_ids = torch.full((b, q), self.pad_id, dtype=torch.long)
        positions = torch.full((b, q), g, dtype=torch.long)
        # query at column c sees columns [0, seen[c]) (its view's content) and [start[c], c] (its
        # own block: the content itself for content tokens, its tail for tail tokens); padding
        # sees only itself
        seen = torch.zeros((b, q), dtype=torch.long)
        start = torch.arange(q).repeat(b, 1)
        for r, it in enumerate(items):
            n = len(it.content)
            if n:
                input_ids[r, :n] = torch.tensor(it.content, dtype=torch.long)
                positions[r, :n] = torch.arange(g, g + n)
                start[r, :n] = 0
            col = width
            for j in range(6):
                tail = it.suffixes[j] + extra
                c0 = col + slots[j] - len(tail)
                c1 = col + slots[j]
                input_ids[r, c0:c1] = torch.tensor(tail, dtype=torch.long)
                positions[r, c0:c1] = torch.arange(g + it.bases[j], g + it.bases[j] + len(tail))
                seen[r, c0:c1] = it.bases[j]
                start[r, c0:c1] = c0
                col = c1
        keys = torch.arange(q)
        allowed = (keys[None, None, :] < seen[:, :, None]) | (
            (keys[None, None, :] >= start[:, :, None]) & (keys[None, None, :] <= keys[None, :, None]))
        if g:
            allowed = torch.cat([torch.ones((b, q, g), dtype=torch.bool), allowed], dim=2)
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        ends = np.cumsum([width] + slots)[1:]
        first_cols = [int(e) - 1 - len(extra) for e in ends]
        second_cols = [int(e) - 1 for e in ends] if extra else []
        keep = first_cols + second_cols
        kwargs = dict(input_ids=input_ids.to(self.device), attention_mask=mask[:, None].to(self.device),
                      position_ids=positions.to(self.device),
                      logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device))
        if g:
            cache = copy.deepcopy(self.prefix_cache)
            cache.batch_repeat_interleave(b)
            kwargs.update({self.cache_name: cache, "use_cache": True})
        else:
            kwargs.update(use_cache=False)
        logits = self.model(**kwargs).logits  # (b, 6 or 12, V)
        first = torch.log_softmax(logits[:, :6].float(), -1).reshape(b * 6, -1)
        second = torch.log_softmax(logits[:, 6:12].float(), -1).reshape(b * 6, -1) if extra else None
        scores, mass = _score_probs(first, second, self.st, self.min_mass)
        return scores.reshape(b, 6), mass.reshape(b, 6)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.double().cpu(), b.double().cpu()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(nan_a, nan_b) and ((a - b).abs()[~nan_a] <= tol).all())


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
    info: dict | None = None,
):
    """Expected 0–10 scores, float64 (N, 6) in ``COLUMNS`` order; NaN = missing.

    Every judgement's score is read from its own judge prompt (template, framing, the sample,
    the question, the prefill). Samples too long for ``max_length`` tokens per judge prompt are
    shortened (response and prompt, from their ends; both views show the same shortening).

    With ``share_prefix`` (default) the work common to several judgements is done once:

    - the framing shared by all judge prompts (the chat template's opening, a default system
      prompt, the judge's instructions and rubric) runs once and its KV cache is reused;
    - per sample, ONE pass over the instruction + response serves all 6 judgements: the
      prompt-alone judgements branch off at the end of the instruction (they see nothing
      after it), the full ones at the end of the response, and each adds only its short
      question + prefill. ``max_batch_size`` samples share one forward pass (``_PackedReader``).

    This needs a transformers causal LM with eager or sdpa attention (custom 4D masks). It is
    checked once per call against the plain computation on one sample; models that do not
    qualify or fail the check fall back to one forward pass per judgement (with the shared
    framing cache when the model takes a KV cache), ``max_batch_size`` judge prompts
    at a time, right-padded. ``share_prefix=False`` always runs every judge prompt whole (the
    plain computation). All ways give the same scores up to float rounding.

    ``progress(done, total)`` counts judgements. With ``return_mass=True`` also returns the
    (N, 6) probability mass that fell on the score tokens.

    ``info`` (a dict, filled in place) says which path ran, because the fall-back is an order
    of magnitude slower and callers must be able to say so: ``judge_path`` is ``packed`` (one
    pass per sample), ``per_judgement`` (one pass per judgement) or ``whole`` (share_prefix
    off); ``packed_samples`` / ``per_judgement_samples`` count samples by path, and
    ``fallback_reason`` says why the packed path was not taken (None when it was)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    n = len(prompts)
    out = np.full((n, 6), np.nan, dtype=np.float64)
    mass_out = np.zeros((n, 6), dtype=np.float64)
    if info is None:
        info = {}
    info.update(judge_path="whole" if not share_prefix else "per_judgement", packed_samples=0,
                per_judgement_samples=n, fallback_reason=None if not share_prefix else "no samples")
    if n == 0:
        return (out, mass_out) if return_mass else out
    st = find_score_tokens(tokenizer, prefill)
    if st is None:
        log.warning("the score tokens 0..10 cannot be found in this tokenizer: all quality judgements are missing")
        info.update(fallback_reason="no score tokens in the tokenizer", per_judgement_samples=0)
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

    def report(k: int) -> None:
        nonlocal done
        done += k
        if progress:
            progress(done, total)

    try:
        with torch.inference_mode():
            prefix: list[int] = []
            if share_prefix and cache_param(model) is not None:
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

            pending = np.ones(n, dtype=bool)  # samples whose judgements are still to compute
            reason = packed_unsupported_reason(model) if share_prefix else None
            if share_prefix and reason is not None:
                info["fallback_reason"] = reason
                log.warning("shared judgement passes unavailable (%s); one forward pass per judgement, "
                            "about 5x slower", reason)
            if share_prefix and reason is None:
                plans = []
                for i in range(n):
                    six = seqs[6 * i: 6 * i + 6]
                    if all(x[:p] == prefix for x in six):
                        plan = _plan_sample(i, six, p)
                        if plan is not None:
                            plans.append(plan)
                if not plans:
                    info["fallback_reason"] = "no judge prompt starts with the shared framing"
                else:
                    packed = _PackedReader(model, st, pad_id, min_mass, reader.prefix_cache, p)
                    plans, failure = _run_packed(packed, reader, plans, seqs, flat, flat_mass, pending, report)
                    info["fallback_reason"] = failure
                    if failure is None:
                        info["judge_path"] = "packed"
                    if plans:
                        # the order is by content length: similar rows share a batch (less padding)
                        plans.sort(key=lambda it: (-(len(it.content) + sum(map(len, it.suffixes))), it.index))
                        for b0 in range(0, len(plans), max_batch_size):
                            batch = plans[b0: b0 + max_batch_size]
                            scores, mass = packed.run(batch)
                            for it, s_row, m_row in zip(batch, scores.cpu().double().numpy(),
                                                        mass.cpu().double().numpy()):
                                flat[6 * it.index: 6 * it.index + 6] = s_row
                                flat_mass[6 * it.index: 6 * it.index + 6] = m_row
                                pending[it.index] = False
                            report(6 * len(batch))

            # one forward pass per judgement: samples the shared path did not take
            left = [6 * i + j for i in np.flatnonzero(pending) for j in range(6)]
            shared = {i: bool(p) and len(seqs[i]) > p and seqs[i][:p] == prefix for i in left}
            for group in (True, False):  # prompts that start with the prefix, then any others
                members = [i for i in left if shared[i] == group]
                order = sorted(members, key=lambda i: (-len(seqs[i]), i))
                for b0 in range(0, len(order), max_batch_size):
                    batch = order[b0: b0 + max_batch_size]
                    scores, mass = reader.run([seqs[i][p:] if group else seqs[i] for i in batch], with_prefix=group)
                    flat[batch] = scores.cpu().double().numpy()
                    flat_mass[batch] = mass.cpu().double().numpy()
                    report(len(batch))
    finally:
        if was_training:
            model.train()
    n_per = int(pending.sum())
    info.update(packed_samples=n - n_per if info["judge_path"] == "packed" else 0, per_judgement_samples=n_per)
    out[:] = flat.reshape(n, 6)
    mass_out[:] = flat_mass.reshape(n, 6)
    n_low = int(np.isnan(out).sum())
    if n_low:
        log.info("%d of %d judgements had < %g probability on the score tokens: recorded as missing",
                 n_low, total, min_mass)
    return (out, mass_out) if return_mass else out


def _run_packed(packed: _PackedReader, reader: _Reader, plans: list[_Packed], seqs, flat, flat_mass, pending,
                report) -> tuple[list[_Packed], str | None]:
    """Check the shared path once against whole judge prompts, on the sample that is cheapest to
    judge (its plain scores are kept). Returns the plans still to run: all but the checked one,
    or none when the check fails (the model does not honour the packed layout: every judgement
    then runs on its own), and why it failed (None when it did not)."""
    probe = min(plans, key=lambda it: (len(it.content) + sum(map(len, it.suffixes)), it.index))
    rows = list(range(6 * probe.index, 6 * probe.index + 6))
    try:
        got, got_mass = packed.run([probe])
    except Exception as exc:  # noqa: BLE001 - any model that rejects the packed inputs
        reason = f"the model rejects the packed inputs ({type(exc).__name__}: {exc})"
        log.warning("shared judgement passes unavailable: %s; one forward pass per judgement", reason)
        return [], reason
    want, want_mass = reader.run([seqs[i] for i in rows], with_prefix=False)
    tol = 1e-3 if packed.dtype in (torch.float32, torch.float64) else 0.15
    if not (_close(got[0], want, tol) and _close(got_mass[0], want_mass, max(tol / 10, 1e-4))):
        diff = float((got[0].double().cpu() - want.double().cpu()).abs().nan_to_num(0).max())
        reason = f"packed passes disagree with whole judge prompts on this model (max |Δscore| {diff:.4g})"
        log.warning("%s; one forward pass per judgement", reason)
        return [], reason
    flat[rows] = want.cpu().double().numpy()
    flat_mass[rows] = want_mass.cpu().double().numpy()
    pending[probe.index] = False
    report(6)
    return [it for it in plans if it is not probe], None


# ----------------------------------------------------------------------------------------------
# generated scores

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
