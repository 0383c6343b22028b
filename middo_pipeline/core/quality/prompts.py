"""The judge prompts: one user message per judgement (dimension × view), rendered with the
chat template and the prefill, and the token sequences of all judgements of a batch of samples,
shortened to fit ``max_length``."""

from __future__ import annotations

import logging

from middo_pipeline.core.encoding import control_strings, escape_controls

log = logging.getLogger(__name__)

DIMENSIONS = ("factuality", "clarity", "completeness")
VIEWS = ("prompt", "full")
COLUMNS = tuple(f"{d}_{v}" for v in VIEWS for d in DIMENSIONS)  # the (N, 6) column order
DEFAULT_PREFILL = "Score: "
TRUNCATION_MARK = " […]"

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
    controls = control_strings(tokenizer)
    for prompt, response in zip(prompts, responses):
        # sample text is data: a control-token string in it must not open a turn in the judge prompt
        prompt = escape_controls(prompt or "", controls)
        response = escape_controls(response or "", controls)
        p, r = _fit_texts(tokenizer, _encode(tokenizer, prompt), _encode(tokenizer, response), prompt, response, budget)
        for view in VIEWS:
            for d in DIMENSIONS:
                ids = _encode(
                    tokenizer, _render(tokenizer, judge_messages(d, p, r if view == "full" else None), prefill)
                )
                if len(ids) > limit:  # last resort: keep the end (the question and the prefill)
                    ids = ids[-limit:]
                    n_cut += 1
                seqs.append(ids)
    if n_cut:
        log.warning("%d judge prompts were cut from the left to fit max_length=%d", n_cut, max_length)
    return seqs
