"""The gate's text rules: what a candidate's words alone say against it (held-out overlap,
control tokens, talk about the task, an answer given away, a statement for a task, a copied
task), and whether two samples read as the same task. No model needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from middo_pipeline.core.encoding import GENERIC_CONTROL

DEFAULT_NGRAM = 8  # words per n-gram of the held-out overlap check
_WORD = re.compile(r"\w+", re.UNICODE)


def ngram_set(texts: Iterable[str], n: int = DEFAULT_NGRAM) -> set[tuple[str, ...]]:
    """Every run of ``n`` lower-cased words in ``texts``."""
    out: set[tuple[str, ...]] = set()
    for t in texts:
        words = _WORD.findall((t or "").lower())
        out.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return out


def _shares_ngram(text: str, grams: set, n: int) -> bool:
    if not grams:
        return False
    words = _WORD.findall((text or "").lower())
    return any(tuple(words[i : i + n]) in grams for i in range(len(words) - n + 1))


# Answers about the task instead of the task. Opening phrases are looked for in the first
# sentence only (a polite e-mail may say "I'm afraid I can't attend" further down); the others
# anywhere in the response; the last group in the new instruction.
_META_OPENING = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\bI(?:'m| am) (?:sorry|afraid|unable|not able)\b",
        r"\bI (?:can(?:no|')t|cannot|don't have|do not have)\b",
        r"\bas an (?:AI|artificial intelligence|language model)\b",
        r"^\W*(?:absolutely|sure|certainly|of course|great|awesome|okay|ok)\b[!,.]",
        r"\bI(?:'d| would) (?:be )?(?:happy|glad|love)\b",
        r"\bI(?:'m| am) (?:happy|glad|ready|here) to\b",
    )
)
_META_ANYWHERE = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\bhere(?:'s| is) (?:a |an |the |my |your )?(?:revised|rewritten|simplified|corrected|improved|updated"
        r"|shorter|new) (?:version|text|sentence|prompt|task|instruction|question)\b",
        r"\b(?:the|your) original (?:sentence|task|text|question|instruction|prompt|statement|message|phrase|request)\b",
        r"\b(?:your|the) next (?:question|challenge|task)\b",
        r"\b(?:this|the) (?:revised|rewritten|simplified) (?:version|text|sentence|prompt|task|instruction)\b",
    )
)
_META_INSTRUCTION = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\b(?:the|this) original (?:task|instruction|prompt|question|sentence|text|statement)\b",
        r"\b(?:a|the|this) (?:revised|rewritten|simplified) version (?:could|would|might|is)\b",
        r"\b(?:in )?this task,? you\b",
        r"\b(?:this|the) (?:new )?(?:task|instruction|question) requires\b",
        r"\brewrite (?:the|this) (?:task|instruction|prompt)\b",
        # a task described instead of set ("The task is to read a text file line by line in
        # Python.", "A new instruction: ...")
        r"^\W*(?:the|this|my|your|our) (?:task|goal|instruction|question) (?:is|was) (?:to|about)\b",
        r"^\W*(?:a |the )?new (?:instruction|task|question|prompt)\s*:",
    )
)
_FIRST_SENTENCE = re.compile(r"[.!?](?:\s|$)")


def meta_answer(instruction: str, output: str) -> str | None:
    """The phrase that shows a sample talks about the task instead of doing it (a refusal, an
    assistant pleasantry, "the original sentence", an instruction about "the original task"),
    or None."""
    out = (output or "").strip()
    m = _FIRST_SENTENCE.search(out)
    opening = out[: m.end()] if m else out[:200]
    for pats, text in ((_META_OPENING, opening), (_META_ANYWHERE, out), (_META_INSTRUCTION, instruction or "")):
        for p in pats:
            hit = p.search(text)
            if hit:
                return hit.group(0).strip()
    return None


def answer_in_prompt(instruction: str, output: str, min_words: int = 4) -> bool:
    """The whole response (at least ``min_words`` words) stands in the instruction: a task that
    gives its own answer away teaches nothing, and its response loss is low for that reason
    alone, so the loss checks would take it for an easy, clean sample. Only the task itself,
    its first paragraph, is read: an answer found in the material after it (an input, which a
    new prompt carries folded in after a blank line) can be a legitimate extraction."""
    words = _WORD.findall((output or "").lower())
    if len(words) < min_words:
        return False
    task = (instruction or "").strip().split("\n\n", 1)[0]
    return " ".join(words) in " ".join(_WORD.findall(task.lower()))


# A new instruction that is a claim, not a task: it opens with a determiner, states something
# with a copula, a modal or "use", asks nothing and is one sentence ("The sum of the interior
# angles of a polygon is always equal to 360 degrees."; "A kilogram of feathers is slightly
# heavier than a kilogram of iron."). Word problems ("A train leaves at 9. When does it
# arrive?") ask; "The following sentence is wrong: ..." points at its material. None of the 491
# written rows is caught (tested).
_DETERMINERS = frozenset("the a an this these that those it there".split())
_STATING = frozenset("is are was were has have had can could will would should may might must use uses".split())
_POINTS_AT = frozenset("following below given above".split())


def states_not_asks(instruction: str) -> bool:
    """Whether an instruction reads as a statement rather than a task (see ``_STATING``)."""
    text = (instruction or "").strip()
    words = _WORD.findall(text.lower())
    if not words or "?" in text or words[0] not in _DETERMINERS:
        return False
    vocab = set(words)
    if _POINTS_AT & vocab or not _STATING & vocab:
        return False
    return len(_FIRST_SENTENCE.findall(text)) <= 1


def repeats_instruction(instruction: str, output: str, words: int = 6) -> bool:
    """Whether the response opens with the instruction's first ``words`` words (at least four):
    an answer that copies its task back ("The task is to read a text file line by line in
    Python. You can ..."), which a small model's losses score as easy and fluent."""
    a = _WORD.findall((instruction or "").lower())
    b = _WORD.findall((output or "").lower())
    n = min(words, len(a))
    return n >= 4 and b[:n] == a[:n]


# Words that say nothing about which task a prompt is: function words and request politeness.
_STOPWORDS = frozenset(
    """a an the this that these those is are was were be been being am do does did done of in on at
    to for from by with without and or but nor so as if it its it's into onto about than then
    what which who whom whose how why when where there here i you your yours we our us he she they
    them his her their me my mine please could would can will should shall may might must kindly
    just also very some any s t""".split()
)


def content_words(text: str) -> frozenset[str]:
    """The lower-cased words of ``text`` that are not function words."""
    return frozenset(w for w in _WORD.findall((text or "").lower()) if w not in _STOPWORDS)


def same_task(
    prompt_a: str,
    response_a: str,
    prompt_b: str,
    response_b: str,
    answer_overlap: float = 0.5,
    answer_min_words: int = 3,
) -> bool:
    """Whether two samples read as the same task: every content word of one prompt stands in
    the other (a paraphrase that adds "please" or "in one sentence"; a prompt with no content
    word counts as the same), or their answers, each of at least ``answer_min_words`` content
    words, share at least ``answer_overlap`` of them (Jaccard: a reworded question with the
    same answer; "Yes." or "4" says nothing about which task it answers). A question on the
    same template about another thing (another fold, another colour code) changes a content
    word and its answer."""
    pa, pb = content_words(prompt_a), content_words(prompt_b)
    small, big = (pa, pb) if len(pa) <= len(pb) else (pb, pa)
    if small <= big:
        return True
    ra, rb = content_words(response_a), content_words(response_b)
    if min(len(ra), len(rb)) < answer_min_words:
        return False
    return len(ra & rb) / len(ra | rb) >= answer_overlap


def has_control_tokens(text: str, extra: Sequence[str] = ()) -> bool:
    text = text or ""
    return bool(GENERIC_CONTROL.search(text)) or any(tok and tok in text for tok in extra)


def text_reasons(row: dict, heldout_grams: set, ngram: int, control_tokens: Sequence[str] = ()) -> list[str]:
    """The rules a generated candidate breaks by its text alone (no model needed)."""
    reasons = []
    prompt, output = row.get("instruction_after") or "", row.get("output_after") or ""
    text = f"{prompt}\n{output}"
    if row.get("truncated"):
        reasons.append("cut at the token limit")
    if has_control_tokens(text, control_tokens):
        reasons.append("chat control tokens")
    if _shares_ngram(text, heldout_grams, ngram):
        reasons.append("overlaps the held-out set")
    if meta_answer(prompt, output):
        reasons.append("talks about the task")
    if answer_in_prompt(prompt, output):
        reasons.append("answer given in the prompt")
    if prompt != (row.get("instruction_before") or "") and states_not_asks(prompt):
        reasons.append("a statement, not a task")
    if repeats_instruction(prompt, output):
        reasons.append("response repeats the task")
    return reasons
