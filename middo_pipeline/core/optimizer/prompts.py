"""Requests for the optimizer LLM: simplify / rewrite / extend a prompt, then answer the new prompt.

Two styles:

``stepwise`` (strong models: GPT-4o-mini class, a served 7B+ instruct model)
    The method's explicit steps. Simplify: list ways to simplify -> plan -> rewrite -> review ->
    final prompt. Rewrite: name why the sample is poor -> plan -> rewritten prompt -> final.
    Extend: the sparse prompt as the core plus its nearest neighbours as hints -> one brand-new
    prompt on the thin topic. Every answer ends with a line ``### Final prompt`` followed by
    the prompt and nothing else (``parsing.parse_final_prompt`` reads it back).

``direct`` (small local models such as SmolLM2-135M that cannot follow multi-step formats)
    One short instruction, and the assistant turn is *prefilled* with a label
    (``Simplified instruction:``) so that the continuation itself is the new prompt.

The new prompt always stands alone: a sample's ``input`` is given to the optimizer together
with its instruction, and the new sample has ``input = ""`` (the rewrite folds whatever of the
input is needed into the prompt).

The second step, ``response_request``, asks for a plain helpful answer to the new prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from middo_pipeline.core.llm.protocol import ChatRequest
from middo_pipeline.core.schema import EXTENDED, REWRITTEN, SIMPLIFIED

PromptStyle = Literal["direct", "stepwise"]
STYLES: tuple[str, ...] = get_args(PromptStyle)
FINAL_MARKER = "### Final prompt"

# labels the direct style prefills the assistant turn with
DIRECT_PREFILL = {
    SIMPLIFIED: "Simplified instruction:",
    REWRITTEN: "Improved instruction:",
    EXTENDED: "New instruction:",
}


@dataclass(frozen=True)
class PromptConfig:
    style: PromptStyle = "direct"  # "direct" (small local models) | "stepwise" (strong models)
    max_prompt_tokens: int = 160  # new tokens for the prompt step (stepwise needs ~768)
    max_response_tokens: int = 192  # new tokens for the response step
    temperature: float = 0.0
    seed: int = 0
    max_hints: int = 4  # extend: at most this many neighbour prompts shown as hints
    max_source_chars: int = 4000  # a longer source prompt is shortened (middle cut) in the request

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"prompt style must be one of {STYLES}, got {self.style!r}")
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1:
            raise ValueError("max_prompt_tokens and max_response_tokens must be >= 1")
        if self.max_hints < 0:
            raise ValueError("max_hints must be >= 0")


def _shorten(text: str, limit: int) -> str:
    text = text.strip()
    if limit <= 0 or len(text) <= limit:
        return text
    head = int(limit * 0.7)
    tail = max(limit - head - 20, 0)
    return text[:head].rstrip() + "\n[... shortened ...]\n" + (text[-tail:].lstrip() if tail else "")


# ---------------------------------------------------------------- stepwise

_STEPWISE_SYSTEM = (
    "You improve the training data of an instruction-following assistant. You work through the "
    "numbered steps you are given, showing each step under its own heading, and you always end "
    f"with a line that reads exactly `{FINAL_MARKER}` followed by the finished prompt alone."
)

_FINAL_RULE = (
    f"Finally, on a line of its own write exactly `{FINAL_MARKER}`, and below it only the finished "
    "prompt: self-contained (any material it needs is written into it), without an answer, without "
    "quotes or commentary, and nothing after it."
)

_STEPWISE_SIMPLIFY = """\
A model fine-tuned on the prompt below still could not learn to answer it: it is too hard to be \
learned from. Turn it into an easier, more learnable prompt that trains the same kind of skill.

Steps:
1. Ways to simplify - list concrete options for this prompt (narrow the scope, split off \
sub-questions, use smaller numbers or shorter material, remove rare jargon, add a guiding hint, \
choose a more familiar setting, ...).
2. Plan - pick the options that keep the prompt meaningful and explain how you will apply them.
3. Rewrite - write the simplified prompt.
4. Review - check that it is clear, answerable, on the same subject, and clearly easier than \
the original; fix whatever is not.
{final}

Original prompt:
<<<
{prompt}
>>>"""

_STEPWISE_REWRITE = """\
The prompt below was judged poor training data for an assistant (weak on factuality, clarity \
or completeness). Rewrite it into a high-quality prompt on the same subject.

Steps:
1. Problems - name the specific reasons it is poor: false premises or factual errors, vague or \
ambiguous wording, missing context or constraints, an input that does not fit the instruction, \
a request that cannot be answered as stated.
2. Plan - say how you will fix each problem.
3. Rewrite - write the improved prompt.
4. Check - confirm it is accurate, clear, complete and answerable; fix whatever is not.
{final}

Original prompt:
<<<
{prompt}
>>>"""

_STEPWISE_EXTEND = """\
The core prompt below lies in a thinly covered region of a training dataset. The other prompts \
are its nearest neighbours in that dataset; use them only as hints about the surrounding topic. \
Write ONE brand-new prompt that adds coverage where the core prompt is.

Steps:
1. Topic - describe the subject and the skill the core prompt exercises.
2. Gaps - with the neighbours as hints, note related situations, formats or angles that are \
still missing.
3. Idea - choose one gap; the new prompt must not copy or paraphrase any prompt shown.
4. Draft and check - write it and make sure it is self-contained and answerable.
{final}

Core prompt:
<<<
{prompt}
>>>
{hints}"""


# ---------------------------------------------------------------- direct

_DIRECT_SYSTEM = "You are a helpful assistant who writes tasks for a training dataset."

_DIRECT_SIMPLIFY = (
    "Rewrite this task as an easier, shorter task about the same thing. Reply with the new task only.\n\nTask: {prompt}"
)
_DIRECT_REWRITE = (
    "Rewrite this task so that it is clear, correct and complete, with all needed details in it. "
    "Reply with the improved task only.\n\nTask: {prompt}"
)
_DIRECT_EXTEND = (
    "Here are some tasks:\n{listing}\n\nWrite one new task on the same topic as task 1. "
    "It must be different from every task above. Reply with the new task only."
)

_RESPONSE_SYSTEM = "You are a helpful assistant. Answer the request accurately, clearly and completely."


def _request(cfg: PromptConfig, system: str, user: str, *, max_tokens: int, prefill: str = "") -> ChatRequest:
    return ChatRequest(
        messages=(("system", system), ("user", user)),
        max_tokens=max_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
        prefill=prefill,
    )


def _one_prompt_request(prompt: str, config: PromptConfig, stepwise: str, direct: str, operation: str) -> ChatRequest:
    """The prompt step of an operation on one prompt (simplify, rewrite), in the configured style."""
    prompt = _shorten(prompt, config.max_source_chars)
    if config.style == "stepwise":
        user = stepwise.format(final=_FINAL_RULE, prompt=prompt)
        return _request(config, _STEPWISE_SYSTEM, user, max_tokens=config.max_prompt_tokens)
    return _request(
        config,
        _DIRECT_SYSTEM,
        direct.format(prompt=prompt),
        max_tokens=config.max_prompt_tokens,
        prefill=DIRECT_PREFILL[operation],
    )


def simplify_request(prompt: str, config: PromptConfig) -> ChatRequest:
    """Ask for an easier version of a hard prompt (``prompt`` = instruction + input)."""
    return _one_prompt_request(prompt, config, _STEPWISE_SIMPLIFY, _DIRECT_SIMPLIFY, SIMPLIFIED)


def rewrite_request(prompt: str, config: PromptConfig) -> ChatRequest:
    """Ask for a better version of a low-quality prompt."""
    return _one_prompt_request(prompt, config, _STEPWISE_REWRITE, _DIRECT_REWRITE, REWRITTEN)


def extend_request(prompt: str, neighbor_prompts: Sequence[str], config: PromptConfig) -> ChatRequest:
    """Ask for one brand-new prompt on the sparse prompt's topic, its neighbours as hints."""
    prompt = _shorten(prompt, config.max_source_chars)
    hints = [_shorten(p, config.max_source_chars // 2) for p in list(neighbor_prompts)[: config.max_hints]]
    if config.style == "stepwise":
        block = "\n".join(f"Neighbour prompt {i}:\n<<<\n{h}\n>>>" for i, h in enumerate(hints, 1))
        user = _STEPWISE_EXTEND.format(final=_FINAL_RULE, prompt=prompt, hints=block).rstrip()
        return _request(config, _STEPWISE_SYSTEM, user, max_tokens=config.max_prompt_tokens)
    listing = "\n".join(f"{i}. {' '.join(p.split())}" for i, p in enumerate([prompt, *hints], 1))
    return _request(
        config,
        _DIRECT_SYSTEM,
        _DIRECT_EXTEND.format(listing=listing),
        max_tokens=config.max_prompt_tokens,
        prefill=DIRECT_PREFILL[EXTENDED],
    )


def operation_request(
    operation: str, prompt: str, config: PromptConfig, neighbor_prompts: Sequence[str] = ()
) -> ChatRequest:
    """The prompt-step request for ``operation`` (``simplified`` / ``rewritten`` / ``extended``)."""
    if operation == SIMPLIFIED:
        return simplify_request(prompt, config)
    if operation == REWRITTEN:
        return rewrite_request(prompt, config)
    if operation == EXTENDED:
        return extend_request(prompt, neighbor_prompts, config)
    raise ValueError(f"unknown optimizer operation {operation!r}: expected one of {(SIMPLIFIED, REWRITTEN, EXTENDED)}")


def response_request(new_prompt: str, config: PromptConfig | None = None) -> ChatRequest:
    """The response step: a plain helpful answer to the new prompt (same for both styles)."""
    config = config or PromptConfig()
    return _request(config, _RESPONSE_SYSTEM, new_prompt.strip(), max_tokens=config.max_response_tokens)
