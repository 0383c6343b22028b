"""Reading new prompts and responses out of optimizer completions, the way real models write them."""

from __future__ import annotations

import pytest

from middo_pipeline.core.optimizer.parsing import clean_response, normalize_for_compare, parse_final_prompt

ORIGINAL = "Give me the capital of France."

STEPWISE_GOOD = [
    # plain header, prompt on the next line
    (
        "1. Ways to simplify\n- fewer steps\n\n2. Plan\n...\n\n### Final prompt\nWrite a short poem about the sea.",
        "Write a short poem about the sea.",
    ),
    # bold inline marker, trailing commentary paragraph
    (
        "**Review** looks fine.\n\n**Final Prompt:** Explain photosynthesis in two sentences.\n\n"
        "This prompt is simpler because it limits the length.",
        "Explain photosynthesis in two sentences.",
    ),
    # header with a fenced block
    ("## Final Prompt\n\n```text\nList three prime numbers below 20.\n```\n", "List three prime numbers below 20."),
    # numbered step with a colon, quoted prompt
    ('4. Review: ok\n5. Final prompt:\n"Describe how a bicycle gear works."', "Describe how a bicycle gear works."),
    # upper case, bold prompt, a rule and notes after
    (
        "### FINAL PROMPT\n**Compute 12 * 7 and explain each step.**\n\n---\nNotes: kept it short",
        "Compute 12 * 7 and explain each step.",
    ),
    # qualifier word and a dash
    ("Final simplified prompt - Name two everyday uses of copper.\n", "Name two everyday uses of copper."),
    (
        "#### Final rewritten instruction\n\nSummarize the causes of World War I in five bullet points.",
        "Summarize the causes of World War I in five bullet points.",
    ),
    # the model repeats the marker: the last one wins
    (
        "### Final prompt\nWrite a haiku.\n\nReview: too vague.\n\n### Final prompt\nWrite a haiku about autumn leaves.",
        "Write a haiku about autumn leaves.",
    ),
    # multi-line prompt with folded input, then a new section heading
    (
        "### Final prompt\nTranslate the sentence below into French.\n\nSentence: The weather is nice today.\n\n"
        "## Why this is better\nIt is self-contained.",
        "Translate the sentence below into French.\n\nSentence: The weather is nice today.",
    ),
    # a leading label inside the final section, markdown quote
    (
        "### Final prompt\n> Prompt: Explain what a hash table is, with one example.",
        "Explain what a hash table is, with one example.",
    ),
    # chat-template end token and a following turn
    (
        "### Final prompt\nDescribe the water cycle for a ten-year-old.<|im_end|>\n<|im_start|>user\nthanks",
        "Describe the water cycle for a ten-year-old.",
    ),
    # CRLF line endings
    (
        "Plan: ...\r\n### Final prompt\r\nName the largest planet in the solar system.\r\n",
        "Name the largest planet in the solar system.",
    ),
]


@pytest.mark.parametrize("text,expected", STEPWISE_GOOD)
def test_stepwise_good(text, expected):
    assert parse_final_prompt(text, "stepwise", ORIGINAL) == (expected, None)


DIRECT_GOOD = [
    (" Write a poem about cats.\n\nAnswer: Cats are soft.", "Write a poem about cats."),
    ('\n"Name three fruits that are red."\nResponse: apple, cherry', "Name three fruits that are red."),
    (" Instruction: Explain gravity to a child.<|im_end|>", "Explain gravity to a child."),
    (" Simplified instruction: Add 3 and 4.", "Add 3 and 4."),
    (" **New instruction:** List two sources of vitamin C.", "List two sources of vitamin C."),
    (
        " Summarize the text in one sentence.\nInput: The cat sat on the mat all day.",
        "Summarize the text in one sentence.\nInput: The cat sat on the mat all day.",
    ),
    (" \u201cWhat causes the seasons on Earth?\u201d", "What causes the seasons on Earth?"),
    (" Describe a sunrise.\nTask 2: Describe a sunset.", "Describe a sunrise."),
    (" Explain recursion with an example.\nOriginal task: Explain recursion.", "Explain recursion with an example."),
]


@pytest.mark.parametrize("text,expected", DIRECT_GOOD)
def test_direct_good(text, expected):
    assert parse_final_prompt(text, "direct", ORIGINAL) == (expected, None)


@pytest.mark.parametrize(
    "text,style,reason",
    [
        ("", "stepwise", "empty"),
        (None, "direct", "empty"),
        ("   \n  ", "direct", "empty"),
        ("<|im_end|>", "direct", "empty"),
        ("### Final prompt\n", "stepwise", "empty"),
        ("### Final prompt\n```\n```", "stepwise", "empty"),
        (
            "1. Ways to simplify: shorter.\n2. Plan: do it.\nThe final prompt should be short.",
            "stepwise",
            "no final prompt marker",
        ),
        ("Here is the simplified version: Write a poem.", "stepwise", "no final prompt marker"),
        ("### Final prompt\nGive me the capital of France", "stepwise", "same as original"),
        ('**Final Prompt:** "give me the  CAPITAL of france."', "stepwise", "same as original"),
        (" Give me the capital of France.", "direct", "same as original"),
        (" Hi", "direct", "too short"),
        ("### Final prompt\nDo it.", "stepwise", "too short"),
        (" " + "word " * 2000, "direct", "too long"),
        ("I'm sorry, but I can't help with that request.", "stepwise", "refusal"),
        ("### Final prompt\nI cannot rewrite this prompt.", "stepwise", "refusal"),
        (" As an AI language model, I cannot rewrite this.", "direct", "refusal"),
        (" I apologize, but that is not possible.", "direct", "refusal"),
    ],
)
def test_failures(text, style, reason):
    assert parse_final_prompt(text, style, ORIGINAL) == (None, reason)


def test_same_as_any_of_several_originals():
    originals = ["Write about dogs.\n\nGolden retrievers", "Write about dogs.", "Describe a cat."]
    assert parse_final_prompt(" describe a cat", "direct", originals) == (None, "same as original")
    assert parse_final_prompt(" Describe a cat's diet.", "direct", originals) == ("Describe a cat's diet.", None)


def test_unknown_style_raises():
    with pytest.raises(ValueError):
        parse_final_prompt("x", "fancy", "")


def test_normalize_for_compare():
    assert normalize_for_compare("  **Hello,  World!** ") == normalize_for_compare("hello, world")
    assert normalize_for_compare("a b") != normalize_for_compare("a c")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Paris is the capital of France.", ("Paris is the capital of France.", None)),
        ("Response: Paris.", ("Paris.", None)),
        ("**Answer:** 42 is the answer.", ("42 is the answer.", None)),
        ("<|im_start|>assistant\nHello there!<|im_end|>\n<|im_start|>user\nmore", ("Hello there!", None)),
        ("```python\nprint('hi')\n```", ("```python\nprint('hi')\n```", None)),
        ("", (None, "empty")),
        (None, (None, "empty")),
        ("  \n", (None, "empty")),
        ("<|endoftext|>", (None, "empty")),
        ("I'm sorry, but I cannot help with that.", (None, "refusal")),
        ("As an AI language model, I do not have opinions.", (None, "refusal")),
        ("a", (None, "too short")),
    ],
)
def test_clean_response(text, expected):
    assert clean_response(text) == expected


def test_clean_response_keeps_inner_formatting():
    text = "Steps:\n\n1. Boil water.\n2. Add pasta.\n\n    indented code stays"
    assert clean_response(text) == (text, None)
