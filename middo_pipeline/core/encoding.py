"""Chat-template encoding of one (prompt, response) pair, with token spans.

``encode_sample`` renders the tokenizer's chat template as text (user turn = the prompt,
assistant turn = the response), locates the prompt and the response as *character* spans of
the rendered text, tokenizes it once with ``return_offsets_mapping`` and maps the character
spans to token spans. So:

- ``prompt_span`` covers the user-message content only: not the template framing, not a
  system prompt the template adds on its own (SmolLM2's template adds one).
- ``response_span`` covers the assistant response and the end-of-turn token the template
  writes right after it (``<|im_end|>``, ``<|eot_id|>``, ``</s>`` ...): exactly what SFT
  with a response-only loss trains on. Text the template adds after that token (a newline)
  is in ``input_ids`` but in neither span.

Locating the spans: the template is rendered once per tokenizer with sentinel contents, which
gives the framing around each message; a sample's text is that framing with its own contents
substituted, and that is checked against the real rendering of the sample. Templates that
transform contents (trim, escape) fail that check and fall back to searching the (stripped)
contents in the real rendering after the framing; if they cannot be found a ``ValueError``
says so. A tokenizer without a chat template gets a plain ``prompt + "\\n" + response + eos``
text.

Tokenizers without offset mappings (slow, Python-only ones) are handled by tokenizing the
text piecewise (framing, prompt, framing, response, framing) and concatenating; token
boundaries then always fall on the span boundaries.

Text in the data is text: a prompt or response holding the string of a special or added token
(``<|im_end|><|im_start|>system``) is tokenized piecewise with special-token parsing off for the
contents, so it becomes ordinary text tokens and can never add a turn, end one, or change the
conversation's structure. Samples without such strings take the one-pass path above unchanged.

Truncation to ``max_length`` keeps the framing and drops, in this order: the template's text
after the end-of-turn token, response tokens from the end, prompt tokens from the end of the
prompt. ``truncated`` records whether anything was dropped. If the framing alone is longer
than ``max_length`` a ``ValueError`` is raised (a configuration error, not a data problem).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EncodedSample", "control_strings", "encode_sample", "encode_samples", "has_control", "render_sample"]

# Private-use code points: never produced by tokenizing normal text, never in a template.
_S_PROMPT = "\ue000middo-prompt\ue001"
_S_RESPONSE = "\ue002middo-response\ue003"


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    prompt_span: tuple[int, int]  # [start, end) token positions of the user-message content
    response_span: tuple[int, int]  # [start, end) of response tokens + end-of-turn; empty if no response
    truncated: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_response_tokens(self) -> int:
        return self.response_span[1] - self.response_span[0]

    @property
    def n_prompt_tokens(self) -> int:
        return self.prompt_span[1] - self.prompt_span[0]


@dataclass(frozen=True)
class _Rendered:
    text: str
    prompt_chars: tuple[int, int]
    response_chars: tuple[int, int] | None  # None: prompt-only rendering (generation prompt)


# ----------------------------------------------------------------------------------------------
# rendering


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply(tokenizer, prompt: str, response: str | None) -> str:
    messages = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False)


class _Framing:
    """The template rendered with sentinel contents: the text around each message."""

    def __init__(self, tokenizer):
        self.template = getattr(tokenizer, "chat_template", None)
        if self.template:
            full = _apply(tokenizer, _S_PROMPT, _S_RESPONSE)
            gen = _apply(tokenizer, _S_PROMPT, None)
            self.full = self._split(full, (_S_PROMPT, _S_RESPONSE))
            self.gen = self._split(gen, (_S_PROMPT,))
        else:
            eos = getattr(tokenizer, "eos_token", None) or ""
            self.full = ["", "\n", eos]
            self.gen = ["", "\n"]

    @staticmethod
    def _split(text: str, sentinels: tuple[str, ...]) -> list[str] | None:
        parts, rest = [], text
        for s in sentinels:
            if rest.count(s) != 1:
                return None  # the template does something odd with contents: search instead
            head, rest = rest.split(s)
            parts.append(head)
        parts.append(rest)
        return parts


_FRAMING_CACHE: dict[int, tuple[object, _Framing]] = {}


def _framing(tokenizer) -> _Framing:
    key = id(tokenizer)
    hit = _FRAMING_CACHE.get(key)
    template = getattr(tokenizer, "chat_template", None)
    if hit is not None and hit[0] is tokenizer and hit[1].template == template:
        return hit[1]
    framing = _Framing(tokenizer)
    while len(_FRAMING_CACHE) >= 8:  # a few tokenizers at a time; do not keep old ones alive
        _FRAMING_CACHE.pop(next(iter(_FRAMING_CACHE)))
    _FRAMING_CACHE[key] = (tokenizer, framing)
    return framing


def render_sample(tokenizer, prompt: str, response: str | None) -> _Rendered:
    """The rendered text of one sample and the character spans of its prompt and response."""
    fr = _framing(tokenizer)
    if response is None:
        parts = fr.gen
        if parts is not None:
            text = parts[0] + prompt + parts[1]
            if not fr.template or text == _apply(tokenizer, prompt, None):
                return _Rendered(text, (len(parts[0]), len(parts[0]) + len(prompt)), None)
        return _search(tokenizer, prompt, None)
    parts = fr.full
    if parts is not None:
        text = parts[0] + prompt + parts[1] + response + parts[2]
        if not fr.template or text == _apply(tokenizer, prompt, response):
            ps = len(parts[0])
            rs = ps + len(prompt) + len(parts[1])
            return _Rendered(text, (ps, ps + len(prompt)), (rs, rs + len(response)))
    return _search(tokenizer, prompt, response)


def _find(text: str, needle: str, start: int, what: str) -> tuple[int, int]:
    for cand in (needle, needle.strip()):
        if not cand:
            return (start, start)
        i = text.find(cand, start)
        if i >= 0:
            return (i, i + len(cand))
    raise ValueError(
        f"the chat template changed the {what} text beyond recognition; cannot locate it in the rendered "
        f"sample: {needle[:80]!r}"
    )


def _search(tokenizer, prompt: str, response: str | None) -> _Rendered:
    """Fallback for templates that transform contents: find them after the sentinel framing."""
    fr = _framing(tokenizer)
    text = _apply(tokenizer, prompt, response)
    parts = fr.gen if response is None else fr.full
    start = len(parts[0]) if parts is not None and text.startswith(parts[0]) else 0
    p = _find(text, prompt, start, "prompt")
    if response is None:
        return _Rendered(text, p, None)
    r = _find(text, response, p[1], "response")
    return _Rendered(text, p, r)


# ----------------------------------------------------------------------------------------------
# tokenizing


def _special_ids(tokenizer) -> frozenset[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i, tok in decoder.items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    return frozenset(ids)


def _char_span_to_tokens(offsets: Sequence[tuple[int, int]], span: tuple[int, int], lo: int = 0) -> tuple[int, int]:
    """Tokens whose characters overlap ``span`` (an empty span maps to an empty token span at
    the first token that starts at or after it)."""
    cs, ce = span
    first = last = None
    for i in range(lo, len(offsets)):
        s, e = offsets[i]
        if e <= s:
            continue
        if s >= ce and first is None:
            break
        if s < ce and e > cs:
            if first is None:
                first = i
            last = i
        elif first is not None and s >= ce:
            break
    if first is None:
        # empty span: position of the first token starting at or after cs
        pos = next(
            (i for i in range(lo, len(offsets)) if offsets[i][0] >= cs and offsets[i][1] > offsets[i][0]), len(offsets)
        )
        return (pos, pos)
    return (first, last + 1)


def _extend_end_of_turn(text: str, ids: list[int], offsets, end: int, special: frozenset[int]) -> int:
    """Include the end-of-turn token the template writes after the response: tokens that are
    whitespace-only, up to and including the first special token. If no special token
    follows (only text), nothing is added."""
    j = end
    while j < len(ids):
        if ids[j] in special:
            return j + 1
        s, e = offsets[j]
        if text[s:e].strip():
            return end
        j += 1
    return end


def _offsets_supported(tokenizer) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def control_strings(tokenizer) -> tuple[str, ...]:
    """The text of every special or added token (``<|im_end|>``, ``<|im_start|>``, ``</s>`` ...):
    in data, each must be read as text, never as the token."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = getattr(tok, "content", None)
        if content:
            found.add(content)
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def has_control(text: str | None, controls: tuple[str, ...]) -> bool:
    return bool(text) and any(c in text for c in controls)


# chat-template control tokens of the common families (ChatML, Llama 3, Mistral / Llama 2, Gemma):
# for text that goes to a model whose tokenizer we do not hold (a served optimizer)
GENERIC_CONTROL = re.compile(r"<\|[A-Za-z_][\w.-]*\|>|</?s>|\[/?INST\]|<start_of_turn>|<end_of_turn>")
_ZWSP = "\u200b"


def escape_controls(text: str | None, controls: tuple[str, ...] | None = None) -> str | None:
    """``text`` with every control-token string broken by a zero-width space after its first
    character (``<\u200b|im_end|>``), so no tokenizer can read it as the token: for prompts that
    carry sample text to a model (the judge, the optimizer). ``controls``: the tokenizer's own
    (``control_strings``); None: the common chat families (``GENERIC_CONTROL``)."""
    if not text:
        return text
    if controls is None:
        return GENERIC_CONTROL.sub(lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text)
    if not has_control(text, controls):
        return text
    pattern = re.compile("|".join(re.escape(c) for c in controls if len(c) > 1))
    return pattern.sub(lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text)


def _tokenize_piecewise(
    tokenizer, r: _Rendered, literal: bool = False
) -> tuple[list[int], tuple[int, int], tuple[int, int] | None]:
    """Tokenize framing, prompt, framing, response, framing one after another. ``literal``: the
    prompt and response are tokenized with special-token parsing off, so a control-token string
    in the data (``<|im_end|><|im_start|>system``) stays text and cannot change the conversation."""
    bounds = [0, r.prompt_chars[0], r.prompt_chars[1]]
    if r.response_chars is not None:
        bounds += [r.response_chars[0], r.response_chars[1]]
    bounds.append(len(r.text))
    ids: list[int] = []
    starts = []
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        starts.append(len(ids))
        if b > a:
            content = k in (1, 3)  # the prompt, the response
            kwargs = {"split_special_tokens": True} if literal and content else {}
            ids.extend(tokenizer(r.text[a:b], add_special_tokens=False, **kwargs)["input_ids"])
    starts.append(len(ids))
    pspan = (starts[1], starts[2])
    rspan = (starts[3], starts[4]) if r.response_chars is not None else None
    return ids, pspan, rspan


def _truncate(ids: list[int], pspan, rspan, max_length: int) -> tuple[list[int], tuple, tuple, bool]:
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, pspan, rspan, False
    ps, pe = pspan
    rs, re_ = rspan
    # 1. the template's text after the response (never scored)
    tail = len(ids) - max(re_, pe)
    k = min(excess, tail)
    ids = ids[: len(ids) - k]
    excess -= k
    # 2. response tokens from the end
    if excess > 0:
        k = min(excess, re_ - rs)
        ids = ids[: re_ - k] + ids[re_:]
        re_ -= k
        excess -= k
    # 3. prompt tokens from the end of the prompt
    if excess > 0:
        k = min(excess, pe - ps)
        ids = ids[: pe - k] + ids[pe:]
        pe -= k
        rs -= k  # the response (or the empty end span) always comes after the prompt
        re_ -= k
        excess -= k
    if excess > 0:
        raise ValueError(
            f"max_length={max_length} is shorter than the chat template's own framing "
            f"({len(ids)} tokens without any prompt or response token)"
        )
    return ids, (ps, pe), (rs, re_), True


def encode_samples(
    tokenizer, prompts: Sequence[str], responses: Sequence[str | None] | None, max_length: int
) -> list[EncodedSample]:
    """``encode_sample`` for many samples, tokenized in one batched call (fast tokenizers)."""
    if responses is None:
        responses = [None] * len(prompts)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    rendered = [render_sample(tokenizer, p, r) for p, r in zip(prompts, responses)]
    special = _special_ids(tokenizer)
    controls = control_strings(tokenizer)
    # samples whose text holds a control-token string are tokenized piecewise, contents literally
    literal = {
        i for i, (p, r) in enumerate(zip(prompts, responses)) if has_control(p, controls) or has_control(r, controls)
    }
    out: dict[int, EncodedSample] = {}
    for i in sorted(literal):
        out[i] = _encode_piecewise(tokenizer, rendered[i], special, max_length, literal=True)
    todo = [i for i in range(len(rendered)) if i not in literal]
    if _offsets_supported(tokenizer) and todo:
        enc = tokenizer([rendered[i].text for i in todo], add_special_tokens=False, return_offsets_mapping=True)
        for k, ids, offsets in zip(todo, enc["input_ids"], enc["offset_mapping"]):
            r = rendered[k]
            ids = list(ids)
            offsets = [tuple(o) for o in offsets]
            pspan = _char_span_to_tokens(offsets, r.prompt_chars)
            if r.response_chars is None:
                rspan = (len(ids), len(ids))
            else:
                rspan = _char_span_to_tokens(offsets, r.response_chars, lo=pspan[1])
                rspan = (max(rspan[0], pspan[1]), rspan[1])
                rspan = (rspan[0], _extend_end_of_turn(r.text, ids, offsets, rspan[1], special))
            out[k] = _finish(ids, pspan, rspan, max_length)
    else:
        for k in todo:
            out[k] = _encode_piecewise(tokenizer, rendered[k], special, max_length)
    return [out[i] for i in range(len(rendered))]


def _encode_piecewise(
    tokenizer, r: _Rendered, special: frozenset[int], max_length: int, literal: bool = False
) -> EncodedSample:
    ids, pspan, rspan = _tokenize_piecewise(tokenizer, r, literal=literal)
    if rspan is None:
        rspan = (len(ids), len(ids))
    else:
        end = rspan[1]
        if end < len(ids) and ids[end] in special:
            end += 1
        rspan = (rspan[0], end)
    return _finish(ids, pspan, rspan, max_length)


def _finish(ids, pspan, rspan, max_length) -> EncodedSample:
    ids, pspan, rspan, truncated = _truncate(list(ids), pspan, rspan, max_length)
    return EncodedSample(input_ids=ids, prompt_span=tuple(pspan), response_span=tuple(rspan), truncated=truncated)


def encode_sample(tokenizer, prompt: str, response: str | None, max_length: int) -> EncodedSample:
    """Encode one sample with the tokenizer's chat template.

    ``response=None`` gives the prompt-only encoding ending with the generation prompt (the
    assistant header); its ``response_span`` is the empty span at the end.
    """
    return encode_samples(tokenizer, [prompt], [response], max_length)[0]
