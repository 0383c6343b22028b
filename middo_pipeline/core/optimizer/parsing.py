"""Read the new prompt / the new response out of an optimizer completion, or say why not.

``parse_final_prompt(text, style, original)`` returns ``(prompt, None)`` or ``(None, reason)``:

- ``stepwise``: the text after the *last* "final prompt" marker. Tolerated: ``### Final prompt``,
  ``**Final Prompt:**``, ``5. Final prompt:``, ``Final simplified prompt -``, any case, the prompt
  on the marker's line or below it, in a fenced block or in quotes. What follows the prompt
  (a new heading, a ``---`` rule, a "Note:" paragraph) is cut off.
- ``direct``: the completion continues a prefilled label, so its first paragraph is the prompt;
  a repeated label (``Instruction:``), quotes and markdown emphasis are stripped, and a line
  that starts another section (``Answer:``, ``Response:``, ``Task 2:`` ...) ends it.

Failure reasons: ``empty``, ``no final prompt marker``, ``refusal``, ``too short``,
``too long``, ``same as original`` (compared after normalizing case, whitespace, quotes and
punctuation at the ends).

``clean_response(text)`` returns ``(response, None)`` or ``(None, reason)`` with reasons
``empty``, ``refusal``, ``too short``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

MIN_PROMPT_CHARS = 8
MAX_PROMPT_CHARS = 6000
MIN_RESPONSE_CHARS = 2

_KINDS = r"(?:prompt|instruction|task|question)"
# "final" [+ one qualifier word] + kind, at the start of a line (after markdown/numbering), ending
# the line or followed by a colon / dash: "### Final prompt", "**Final Prompt:**", "5. Final task -"
_FINAL_RE = re.compile(
    r"^[ \t>#*_]*(?:(?:step[ \t]*)?\d+[.):][ \t]*)?[*_ \t]*final[ \t]+(?:[a-z-]+[ \t]+)?"
    + _KINDS
    + r"[*_ \t]*(?:[:\-\u2013\u2014][*_ \t]*|(?=\n)|\Z)",
    re.IGNORECASE | re.MULTILINE,
)
_FENCE_RE = re.compile(r"\A```[^\n]*\n(.*?)(?:^```|\Z)", re.DOTALL | re.MULTILINE)
# a line that starts a new section after the prompt
_SECTION_END_RE = re.compile(r"^(?:#{1,6}[ \t]|-{3,}[ \t]*$|\*{3,}[ \t]*$|_{3,}[ \t]*$|```)", re.MULTILINE)
_TRAILER_RE = re.compile(
    r"^[*_ \t]*(?:note|notes|explanation|rationale|why this works|changes made|"
    r"this (?:prompt|version|task|rewrite|new prompt|simplified|rewritten))\b",
    re.IGNORECASE,
)
# labels that may precede the prompt itself (stripped) ...
_LEAD_LABEL_RE = re.compile(
    r"^[ \t*_#>]*(?:(?:simplified|simpler|easier|improved|rewritten|new|revised|final|better)[ \t]+)?"
    r"(?:prompt|instruction|task|question)(?:[ \t]+\d+)?[ \t]*[*_]*[ \t]*:[*_ \t]*",
    re.IGNORECASE,
)
# ... and labels that start something else in a direct completion (cut there)
_DIRECT_STOP_RE = re.compile(
    r"^[ \t*_#>]*(?:answer|response|output|solution|explanation|note|original(?:[ \t]+\w+)?|"
    r"(?:(?:new|another|next)[ \t]+)?(?:task|instruction|prompt|question)(?:[ \t]+\d+)?|assistant|user)"
    r"[ \t]*[*_]*[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
_REFUSAL_START_RE = re.compile(
    r"^[\s\"'*_]*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i cannot|i can'?t|i can not|"
    r"i'?m (?:unable|not able)|i am (?:unable|not able)|i won'?t|unfortunately,? i)",
    re.IGNORECASE,
)
_REFUSAL_ANY_RE = re.compile(r"\bas an ai\b|\bas a(?:n ai)? language model\b", re.IGNORECASE)
_SPECIAL_TOKENS_RE = re.compile(r"<\|[^|>]{1,40}\|>|</s>|<s>|\[/?INST\]")
# an end-of-turn token: whatever follows belongs to another turn
_END_TOKEN_RE = re.compile(r"<\|(?:im_end|endoftext|eot_id|end_of_text|end)\|>|</s>")
_ROLE_HEADER_RE = re.compile(
    r"^\s*<\|(?:im_start|start_header_id)\|>\s*(?:system|user|assistant)\s*(?:<\|end_header_id\|>)?\s*"
)


def _tidy(text: str) -> str:
    """Unix newlines; drop a leading chat-template role header, cut at an end-of-turn token."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ROLE_HEADER_RE.sub("", text, count=1)
    text = _END_TOKEN_RE.split(text, maxsplit=1)[0]
    return _SPECIAL_TOKENS_RE.sub("", text)


_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"


def normalize_for_compare(text: str) -> str:
    """Case, whitespace, quotes/markdown and punctuation at the ends do not make a prompt new."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[*_`#>]+", " ", text)
    text = " ".join(text.split())
    return text.strip(" " + _QUOTES + ".,;:!?")


def _strip_wrapping(text: str) -> str:
    """Remove surrounding quotes, bold/italic markers and leading labels, repeatedly."""
    prev = None
    while prev != text:
        prev = text
        text = text.strip()
        text = _LEAD_LABEL_RE.sub("", text, count=1).strip()
        for mark in ("**", "__", "*", "_", "`"):
            if len(text) > 2 * len(mark) and text.startswith(mark) and text.endswith(mark):
                inner = text[len(mark) : -len(mark)]
                if mark not in inner:
                    text = inner.strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            inner = text[1:-1]
            if not any(q in inner for q in (text[0], text[-1])) or text[0] in "\u201c\u00ab":
                text = inner.strip()
        # a lone bold mark left dangling at either end ("**Write a poem")
        for mark in ("**", "__"):
            if text.count(mark) % 2:
                if text.startswith(mark):
                    text = text[len(mark) :].strip()
                elif text.endswith(mark):
                    text = text[: -len(mark)].strip()
    return text.strip()


def _is_refusal(text: str) -> bool:
    head = text[:300]
    return bool(_REFUSAL_START_RE.match(head) or _REFUSAL_ANY_RE.search(head))


def _after_last_marker(text: str) -> str | None:
    matches = list(_FINAL_RE.finditer(text))
    if not matches:
        return None
    return text[matches[-1].end() :]


def _cut_stepwise(rest: str) -> str:
    rest = rest.strip("\n").strip()
    fence = _FENCE_RE.match(rest)
    if fence:
        return fence.group(1)
    end = _SECTION_END_RE.search(rest, pos=1)
    if end:
        rest = rest[: end.start()]
    paragraphs = re.split(r"\n[ \t]*\n", rest.strip())
    kept = [paragraphs[0]]
    for para in paragraphs[1:]:
        if _TRAILER_RE.match(para):
            break
        kept.append(para)
    return "\n\n".join(kept)


def _cut_direct(text: str) -> str:
    text = text.strip()
    prev = None
    while prev != text:  # a repeated label belongs to the prefill, not to the prompt
        prev = text
        text = _LEAD_LABEL_RE.sub("", text, count=1).lstrip()
    fence = _FENCE_RE.match(text)
    if fence:
        text = fence.group(1)
    first = re.split(r"\n[ \t]*\n", text.strip(), maxsplit=1)[0]
    stop = _DIRECT_STOP_RE.search(first, pos=1)
    if stop:
        first = first[: stop.start()]
    return first


def parse_final_prompt(
    text: str | None,
    style: str,
    original: str | Iterable[str] = "",
    *,
    min_chars: int = MIN_PROMPT_CHARS,
    max_chars: int = MAX_PROMPT_CHARS,
) -> tuple[str | None, str | None]:
    """The new prompt in an optimizer completion: ``(prompt, None)`` or ``(None, reason)``.

    ``original`` is the source prompt, or several (the source, its bare instruction, an extended
    sample's neighbours): a result equal to any of them after normalization is not new.
    """
    if style not in ("direct", "stepwise"):
        raise ValueError(f"style must be 'direct' or 'stepwise', got {style!r}")
    if text is None or not text.strip():
        return None, "empty"
    text = _tidy(text)
    if style == "stepwise":
        rest = _after_last_marker(text)
        if rest is None:
            if _is_refusal(text):
                return None, "refusal"
            return None, "no final prompt marker"
        candidate = _cut_stepwise(rest)
    else:
        candidate = _cut_direct(text)
    prompt = _strip_wrapping(candidate)
    prompt = "\n".join(line.rstrip() for line in prompt.strip().split("\n"))
    if not prompt:
        return None, "empty"
    if _is_refusal(prompt):
        return None, "refusal"
    if len(prompt) < min_chars:
        return None, "too short"
    if len(prompt) > max_chars:
        return None, "too long"
    originals = [original] if isinstance(original, str) else list(original)
    key = normalize_for_compare(prompt)
    if any(o and normalize_for_compare(o) == key for o in originals):
        return None, "same as original"
    return prompt, None


def clean_response(text: str | None, *, min_chars: int = MIN_RESPONSE_CHARS) -> tuple[str | None, str | None]:
    """The new response, tidied: ``(response, None)`` or ``(None, reason)``."""
    if text is None or not text.strip():
        return None, "empty"
    text = _tidy(text)
    text = re.sub(
        r"^[ \t*_#]*(?:response|answer|assistant)[ \t]*[*_]*[ \t]*:[*_ \t]*",
        "",
        text.strip(),
        count=1,
        flags=re.IGNORECASE,
    )
    text = "\n".join(line.rstrip() for line in text.strip().split("\n")).strip()
    if not text:
        return None, "empty"
    if _is_refusal(text):
        return None, "refusal"
    if len(text) < min_chars:
        return None, "too short"
    return text, None
