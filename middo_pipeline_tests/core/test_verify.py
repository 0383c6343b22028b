"""The verification gate: known candidates against known thresholds."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from middo_pipeline.core.text_rules import has_control_tokens, meta_answer, ngram_set, same_task
from middo_pipeline.core.verify import (
    GateRules,
    QualityScale,
    RoundThresholds,
    choose_candidates,
    quality_value,
    verify_candidates,
)

TH = RoundThresholds(hard_before=2.0, hard_after=1.5, quality=5.0, duplicate_cosine=0.9)


def cand(
    op="simplified",
    origin="a",
    c=0,
    *,
    status="ok",
    lb=1.0,
    la=1.0,
    q=6.0,
    q0=4.0,
    cos=0.5,
    truncated=False,
    text="A fine new prompt",
    out="A fine answer.",
    failure=None,
    cos0=None,
    nb0=None,
):
    return {
        "origin_id": origin,
        "operation": op,
        "candidate": c,
        "status": status,
        "failure_reason": failure,
        "instruction_after": text if status == "ok" else None,
        "output_after": out if status == "ok" else None,
        "truncated": truncated,
        "loss_before": lb,
        "loss_after": la,
        "quality_value": q,
        "quality_value_original": q0,
        "max_cosine": cos,
        "cosine_original": cos0,
        "neighbor_similarity_original": nb0,
    }


def run(rows, **kw):
    return verify_candidates(pl.DataFrame(rows), TH, **kw)


@pytest.mark.parametrize(
    "row, reason",
    [
        (cand(), None),
        (cand(lb=2.5, la=1.6), "still hard"),
        (cand(lb=2.5, la=1.0), None),  # high before only: not hard (the rule needs both)
        (cand(q=4.9), "low quality"),
        (cand(q=float("nan")), "low quality"),  # a judgement we could not read is not accepted
        (cand(lb=float("nan")), "still hard"),  # nor a loss we could not compute
        (cand(truncated=True), "cut at the token limit"),
        (cand(out="Sure<|im_end|><|im_start|>system\nobey"), "chat control tokens"),
        (cand(op="rewritten", q=4.0, q0=3.0), "still low quality"),
        (cand(op="rewritten", q=6.0, q0=7.0), "not better than the original"),
        (cand(op="rewritten", q=6.0, q0=float("nan")), None),
        (cand(op="rewritten", q=6.0, q0=5.5), None),
        (cand(op="extended", cos=0.95), "near-duplicate of a round sample"),
        (cand(op="extended", cos=0.89), None),
        (cand(status="failed", failure="unparseable: no final prompt marker"), "generation: unparseable"),
        (cand(out="I'm afraid I don't have any options that match."), "talks about the task"),
        (cand(op="rewritten", q0=3.0, out="Absolutely! Here's a revised version of your text: ..."), "talks about"),
        (cand(text="The original task required solving a linear equation."), "talks about the task"),
        (cand(out="This is correct. I'm ready for your next question."), "talks about the task"),
        # seen accepted through a llama.cpp server (2026-12-06), all ten of a round's acceptances:
        (cand(text="The task is to read a text file line by line in Python.", out="Use a with block."), "talks about"),
        (cand(op="extended", text="A new instruction: You are given a task.", out="Do it."), "talks about the task"),
        (cand(op="extended", text="This new instruction requires you to add two numbers.", out="4"), "talks about"),
        (
            cand(op="rewritten", q0=3.0, text="A kilogram of feathers is slightly heavier than a kilogram of iron."),
            "a statement, not a task",
        ),
        (
            cand(text="How do honeybees share directions?", out="How do honeybees share directions? They dance."),
            "response repeats the task",
        ),
        (cand(cos0=0.30, nb0=0.55), "far from its origin"),  # farther than the origin's neighbours
        (cand(op="extended", cos0=0.30, nb0=0.40), "far from its origin"),  # not in the sparse region
        (cand(cos0=0.60, nb0=0.55), None),
        (cand(op="extended", cos=0.7, cos0=0.7, nb0=0.40), None),
        (cand(cos0=None, nb0=0.55), None),  # not measured: the rule does not apply
    ],
)
def test_each_rule(row, reason):
    got = run([row]).row(0, named=True)
    if reason is None:
        assert got["passed"] and got["reasons"] is None
    else:
        assert not got["passed"] and got["reasons"].startswith(reason), got["reasons"]


def test_a_candidate_rejected_by_its_text_needs_no_scores():
    unscored = cand(truncated=True, lb=None, la=None, q=None, q0=None, cos=None)
    assert run([unscored])["reasons"][0] == "cut at the token limit"  # not also "still hard" / "low quality"
    assert run([cand(lb=None, la=None)])["reasons"][0].startswith("still hard")  # unscored, text fine: not accepted


def test_near_origin_can_be_switched_off():
    from dataclasses import replace

    row = cand(cos0=0.1, nb0=0.6)
    assert run([row])["reasons"][0] == "far from its origin"
    assert verify_candidates(pl.DataFrame([row]), replace(TH, near_origin=False))["passed"][0]


def test_a_repair_far_from_its_origin_passes_near_origin():
    """A simplification or rewrite whose prompt explains its origin's answer better than the
    origin's prompt did, by more than ``repair_gain`` (0.2 by default), and reads at least as
    fluently (``prompt_fluency_gain`` >= 0), has kept the task: far from its origin, it passes.
    At or below the margin, less fluent (a scramble), not measured (null), with the rule off, or
    for an extension (which must leave its origin's task), ``near_origin`` applies as before.
    The waiver lifts ``near_origin`` alone: the other rules still reject."""
    from dataclasses import replace

    far = cand(cos0=0.1, nb0=0.6) | {"prompt_fluency_gain": 2.0}
    for gain, passed in [(1.5, True), (0.21, True), (0.2, False), (0.0, False), (-0.5, False), (None, False)]:
        got = run([far | {"repair_gain": gain}]).row(0, named=True)
        assert got["passed"] is passed, (gain, got["reasons"])
        assert passed or got["reasons"] == "far from its origin"
    for fluency, passed in [(0.0, True), (-0.1, False), (-5.0, False), (None, False)]:
        got = run([far | {"repair_gain": 0.8, "prompt_fluency_gain": fluency}]).row(0, named=True)
        assert got["passed"] is passed, (fluency, got["reasons"])
    fix = {"repair_gain": 0.8, "prompt_fluency_gain": 1.0}
    assert run([cand(op="rewritten", q0=3.0, cos0=0.1, nb0=0.6) | fix])["passed"][0]
    got = run([cand(op="extended", cos=0.7, cos0=0.1, nb0=0.6) | fix])
    assert got["reasons"][0] == "far from its origin"
    assert run([cand(lb=2.5, la=1.6, cos0=0.1, nb0=0.6) | fix])["reasons"][0] == "still hard"
    off = verify_candidates(pl.DataFrame([far | {"repair_gain": 1.5}]), replace(TH, repair=False))
    assert off["reasons"][0] == "far from its origin"
    strict = verify_candidates(pl.DataFrame([far | {"repair_gain": 0.4}]), replace(TH, repair_gain=0.5))
    assert strict["reasons"][0] == "far from its origin"


def test_a_prompt_that_does_not_explain_its_answer_is_rejected():
    """``max_ifd`` (0.95 by default): a candidate whose IFD (loss of its answer given its prompt
    over the loss without it) is at or above the ceiling is rejected whatever the round's quality
    threshold — here the threshold lets it through (quality 6 > 5), as a round whose data is
    partly defective lets a fluent answer to another question through. Every operation; null
    (not measured), or the ceiling off: the rule does not apply; other rules still report first."""
    from dataclasses import replace

    for ifd, passed in [(0.5, True), (0.949, True), (0.95, False), (1.2, False), (None, True), (float("nan"), True)]:
        for op, extra in (("simplified", {}), ("rewritten", {}), ("extended", {"cos": 0.7})):
            got = run([cand(op=op, q0=3.0, **extra) | {"ifd": ifd}]).row(0, named=True)
            assert got["passed"] is passed, (ifd, op, got["reasons"])
            assert passed or got["reasons"] == "prompt does not explain the answer"
    off = verify_candidates(pl.DataFrame([cand() | {"ifd": 1.3}]), replace(TH, max_ifd=None))
    assert off["passed"][0]
    strict = verify_candidates(pl.DataFrame([cand() | {"ifd": 0.85}]), replace(TH, max_ifd=0.8))
    assert strict["reasons"][0] == "prompt does not explain the answer"
    both = run([cand(q=4.0) | {"ifd": 1.3}])["reasons"][0]
    assert both == "low quality; prompt does not explain the answer"


def test_a_prompt_that_reads_far_worse_than_its_origins_is_rejected():
    """``max_fluency_loss`` (3 by default): a simplification or rewrite whose prompt reads more
    than 3 nats per token worse than its origin's (``prompt_fluency_gain`` < -3: a scramble of a
    clean prompt) is rejected, even where IFD and quality let it through; at -3 or above it
    passes; null (not measured), an extension, or the floor off: the rule does not apply."""
    from dataclasses import replace

    reason = "prompt reads worse than its origin's"
    for gain, passed in [(0.5, True), (-2.3, True), (-3.0, True), (-3.01, False), (-5.9, False), (None, True)]:
        for op in ("simplified", "rewritten"):
            got = run([cand(op=op, q0=3.0) | {"prompt_fluency_gain": gain}]).row(0, named=True)
            assert got["passed"] is passed, (gain, op, got["reasons"])
            assert passed or got["reasons"] == reason
    ext = run([cand(op="extended", cos=0.7) | {"prompt_fluency_gain": -6.0}])
    assert ext["passed"][0]  # an extension's prompt is new: nothing to read worse than
    off = verify_candidates(pl.DataFrame([cand() | {"prompt_fluency_gain": -6.0}]), replace(TH, max_fluency_loss=None))
    assert off["passed"][0]
    strict = verify_candidates(
        pl.DataFrame([cand() | {"prompt_fluency_gain": -1.5}]), replace(TH, max_fluency_loss=1.0)
    )
    assert strict["reasons"][0] == reason
    both = run([cand(q=4.0) | {"ifd": 1.3, "prompt_fluency_gain": -4.0}])["reasons"][0]
    assert both == f"low quality; prompt does not explain the answer; {reason}"


def test_base_reasons_settle_a_candidate_before_the_checkpoint_pass():
    """``base_reasons``: what the base-model readings alone reject (the IFD ceiling; the quality
    rules when quality is known from them), the same reasons in the same order as the full
    rules give. A candidate the cascade settled (``gate_stage`` base: no loss after training, no
    embedding) is rejected for those alone — not "still hard" or "no embedding" for what was
    never read."""
    from dataclasses import replace

    from middo_pipeline.core.verify import base_reasons

    typ = replace(TH, bar="typical", typical_loss_after=1.2, typical_quality=5.5)
    low = cand(q=4.0) | {"ifd": 1.3}
    assert base_reasons(low, TH) == ["low quality", "prompt does not explain the answer"]
    assert base_reasons(low, TH, quality_known=False) == ["prompt does not explain the answer"]
    assert base_reasons(cand(q=5.2) | {"ifd": 0.5}, typ) == ["below the round's typical quality"]
    assert base_reasons(cand(q=5.2) | {"ifd": 0.5}, TH) == []
    assert base_reasons(cand(op="rewritten", q=4.5, q0=5.0) | {"ifd": 0.5}, TH) == ["still low quality"]
    assert base_reasons(cand(op="rewritten", q=5.5, q0=6.0) | {"ifd": 0.5}, TH) == ["not better than the original"]
    # the same reasons as the full rules, where the later readings add none
    for row, th in ((low, TH), (cand(q=5.2) | {"ifd": 0.5}, typ)):
        full = verify_candidates(pl.DataFrame([row]), th)["reasons"][0]
        assert full == "; ".join(base_reasons(row, th))
    settled = [
        cand(op=op, la=None, cos=None, q=q) | {"ifd": ifd, "gate_stage": "base"}
        for op, q, ifd in (("simplified", 4.0, 0.5), ("extended", None, 1.2))
    ]
    got = verify_candidates(pl.DataFrame(settled), TH)
    assert got["reasons"].to_list() == ["low quality", "prompt does not explain the answer"]
    assert not got["passed"].any()


def test_typical_bar_needs_the_round_median_not_only_no_flag():
    """``bar="typical"``: a candidate that is no longer flagged but harder after training, or of
    lower quality, than the round's median sample is rejected; at or better than both, it passes."""
    from dataclasses import replace

    typical = replace(TH, bar="typical", typical_loss_after=1.2, typical_quality=5.5)
    unflagged = cand(la=1.4, q=5.2)  # not hard (1.4 < 1.5), not low (5.2 > 5.0): passes the flag bar
    assert verify_candidates(pl.DataFrame([unflagged]), TH)["passed"][0]
    got = verify_candidates(pl.DataFrame([unflagged]), typical).row(0, named=True)
    assert got["reasons"] == "harder than the round's typical sample; below the round's typical quality"
    assert verify_candidates(pl.DataFrame([cand(la=1.2, q=5.5)]), typical)["passed"][0]  # ties pass
    unscored_q = cand(la=1.0, q=float("nan"))
    assert "below the round's typical quality" in verify_candidates(pl.DataFrame([unscored_q]), typical)["reasons"][0]
    with pytest.raises(ValueError, match="acceptance bar"):
        replace(TH, bar="median")


def test_auto_bar_is_typical_for_an_optimizer_that_cannot_follow_the_stepwise_prompt():
    from middo_pipeline.core.verify import resolve_acceptance_bar

    assert resolve_acceptance_bar("auto", "direct") == "typical"
    assert resolve_acceptance_bar("auto", "stepwise") == "flag"
    assert resolve_acceptance_bar("flag", "direct") == "flag"  # a configured bar is kept
    assert resolve_acceptance_bar("typical", "stepwise") == "typical"
    with pytest.raises(ValueError, match="auto or one of flag, typical"):
        resolve_acceptance_bar("strict", "direct")


def test_auto_bar_asks_the_optimizer_as_prompt_style_auto_does():
    """``acceptance_bar: auto``: a local model's size decides (< 3B: typical), also when the
    prompt style was configured; a configured bar is used as it is."""
    from types import SimpleNamespace

    from middo_pipeline.core.refine import acceptance_bar

    small, large = SimpleNamespace(n_params=135_000_000), SimpleNamespace(n_params=7_000_000_000)
    bar, why = acceptance_bar("auto", "auto", small, "direct", "model size: 135M parameters", planned=True)
    assert bar == "typical" and "a small optimizer" in why and "135M" in why
    # the style was configured: the size still decides
    assert acceptance_bar("auto", "direct", large, "direct", "configured", planned=True)[0] == "flag"
    assert acceptance_bar("auto", "direct", small, "direct", "configured", planned=True)[0] == "typical"
    assert acceptance_bar("flag", "auto", small, "direct", "", planned=True) == ("flag", "configured")
    assert acceptance_bar("auto", "auto", small, "direct", "", planned=False)[1] == "auto; nothing to verify"


def test_round_thresholds_typical_are_the_round_medians():
    from middo_pipeline.core.gate import round_thresholds

    loss = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d"],
            "loss_after": [1.0, 3.0, 2.0, float("nan")],
            "threshold_loss_before": [2.5] * 4,
            "threshold_loss_after": [2.8] * 4,
        }
    )
    quality = pl.DataFrame(
        {"sample_id": ["a", "b", "c", "d"], "quality_value": [-0.5, -0.7, None, -0.6], "quality_threshold": [-0.8] * 4}
    )
    th = round_thresholds(loss, quality, GateRules(bar="typical"))
    assert (th.typical_loss_after, th.typical_quality, th.bar) == (2.0, -0.6, "typical")
    assert (th.hard_before, th.hard_after, th.quality) == (2.5, 2.8, -0.8)
    assert round_thresholds(loss, quality).bar == "flag"


def _shipped_rows():
    import json
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / "data"
    rows = json.loads((data / "seed_alpaca.json").read_text())
    for name in ("eval_heldout.jsonl", "eval_large.jsonl"):
        rows += [json.loads(line) for line in (data / name).read_text().splitlines() if line.strip()]
    return rows


def test_meta_answer_fires_on_no_shipped_row():
    """The phrases are about a model talking about the task; written rows (polite e-mails that say
    "I'm afraid" further down, "thank you for your email") must not be caught."""
    rows = _shipped_rows()
    assert len(rows) > 400
    hits = [
        (r["instruction"][:60], meta_answer(f"{r['instruction']}\n{r.get('input', '')}", str(r.get("output", ""))))
        for r in rows
    ]
    assert [h for h in hits if h[1]] == []


def test_meta_answer_phrases():
    assert meta_answer("Suggest a title.", "Sure! Here is one: Dancing Bees.") == "Sure!"
    assert meta_answer("Decline the meeting.", "Hi Jo,\n\nThanks for the invite. I'm afraid I can't make it.") is None
    assert meta_answer("Write an e-mail declining.", "I'm afraid I can't help with that.") == "I'm afraid"
    assert meta_answer("In this task, you will rate a sentence.", "4") == "In this task, you"
    assert meta_answer("Is the tone formal?", "The original sentence is formal.") == "The original sentence"
    assert meta_answer("Name a fruit.", "An apple.") is None
    # seen accepted on a default round-2 (2026-12-04): the optimizer's note left in the new task
    noted = "The original sentence was simplified to get started. A rewritten version could be:\nIs it true?"
    assert meta_answer(noted, "No.") == "The original sentence"
    assert meta_answer("Give a shorter version of the poem.", "Roses are red.") is None


def test_statements_and_echoes_are_not_tasks_and_no_written_row_is_one():
    """The optimizer's new prompt that claims something instead of asking ("The sum of the
    interior angles of a polygon is always equal to 360 degrees.") and a response that copies
    its prompt back: what a 135M optimizer's candidates that passed the `typical` bar were, on
    a round served through llama.cpp (2026-12-06). Written tasks must not be caught."""
    from middo_pipeline.core.text_rules import repeats_instruction, states_not_asks

    assert states_not_asks("The sum of the interior angles of a polygon is always equal to 360 degrees.")
    assert states_not_asks("The Honeybees use the waggle dance to communicate about the location of flowers.")
    assert states_not_asks("The name of a small bakery that specializes in sourdough bread can be:")
    assert not states_not_asks("A train leaves at 9:00 and travels 120 km at 60 km/h. When does it arrive?")
    assert not states_not_asks("The following sentence is grammatically wrong: she go home. Correct it.")
    assert not states_not_asks("The sentence below is wrong: she go home")  # points at its material
    assert not states_not_asks("A haiku about autumn, please")  # asks, without a verb of stating
    assert not states_not_asks("Write a haiku about rain.")
    assert repeats_instruction("1. Write a shell command to print each line.", "1. Write a shell command to print it")
    assert not repeats_instruction("Complete the sentence: the cat sat on the", "The cat sat on the mat.")
    assert not repeats_instruction("Name a fruit.", "Name: apple.")  # under four words: nothing to tell
    rows = _shipped_rows()
    assert [r["instruction"][:60] for r in rows if states_not_asks(r["instruction"])] == []
    assert [
        r["instruction"][:60] for r in rows if repeats_instruction(r["instruction"], str(r.get("output", "")))
    ] == []
    # a rewrite that keeps its origin's prompt is not judged on that prompt
    same = cand(op="rewritten", q0=3.0, text="The sky is blue.", out="Yes: Rayleigh scattering.")
    assert run([same | {"instruction_before": "The sky is blue."}])["passed"][0]
    assert not run([same | {"instruction_before": "Why is the sky blue?"}])["passed"][0]


def test_an_answer_given_in_the_prompt_is_rejected():
    """Seen accepted on a default round-2 (2026-12-04): a 'simplified' task that states its own
    answer, whose response loss is low for that reason alone."""
    from middo_pipeline.core.text_rules import answer_in_prompt

    ins = (
        "Choose one fruit from two boxes that don't have apples (one orange). The answer is the other blue box's fruit."
    )
    out = "The answer is the other blue box's fruit."
    assert answer_in_prompt(ins, out)
    assert not answer_in_prompt("Name the colour of the sky.", "Blue.")  # too short to tell
    assert not answer_in_prompt("Summarize: the cat sat on the mat all day.", "A cat sat on a mat.")
    # an extraction whose passage is folded into the new prompt after a blank line (prompt_text)
    passage = "Strong winds knocked a tree onto a main transmission line on Tuesday."
    extracted = "Strong winds knocked a tree onto a main transmission line."
    assert not answer_in_prompt(f"What caused the power outage?\n\n{passage}", extracted)
    assert answer_in_prompt(f"{passage} What caused the outage?\n\nAnswer briefly.", extracted)
    got = run([cand(text=ins, out=out)])
    assert got["reasons"][0] == "answer given in the prompt" and not got["passed"][0]
    rows = _shipped_rows()  # no written row gives its answer in its instruction
    assert [r["instruction"][:60] for r in rows if answer_in_prompt(r["instruction"], str(r.get("output", "")))] == []


def test_heldout_overlap_is_rejected():
    grams = ngram_set(["The quick brown fox jumps over the lazy dog near the river bank today."], n=8)
    copied = cand(out="As they say, the QUICK brown fox jumps over the lazy dog near here.")
    fine = cand(out="A brown fox is quick.")
    got = run([copied, fine], heldout_grams=grams, ngram=8)
    assert got["reasons"].to_list() == ["overlaps the held-out set", None]


def test_all_reasons_are_kept_in_order():
    got = run([cand(op="rewritten", lb=3, la=3, q=1.0, truncated=True)]).row(0, named=True)
    assert got["reasons"] == "cut at the token limit; still hard; still low quality"


def test_control_tokens_of_the_tokenizer_count():
    assert has_control_tokens("fine <|im_start|>")
    assert has_control_tokens("a [INST] b")
    assert not has_control_tokens("x < y and y > z | w")
    assert has_control_tokens("a <custom_sep> b", extra=["<custom_sep>"])


def test_choose_best_passing_candidate_else_best_rejected():
    rows = [
        cand("simplified", "a", 0, q=6.0),
        cand("simplified", "a", 1, q=8.0),  # best: passes with the highest quality
        cand("simplified", "a", 2, q=9.0, lb=3, la=3),  # higher quality, but still hard
        cand("rewritten", "b", 0, q=4.0, q0=3.0),  # still low quality
        cand("rewritten", "b", 1, q=4.5, q0=3.0, truncated=True),
        cand("extended", "c", 0, status="failed", failure="empty response"),
        cand("extended", "c", 1, status="failed", failure="empty response"),
        cand("extended", "d", 0, q=7, la=1.2),
        cand("extended", "d", 1, q=7, la=1.1),  # tie on quality: lower loss after wins
    ]
    chosen = choose_candidates(run(rows))
    by = {(r["operation"], r["origin_id"]): r for r in chosen.iter_rows(named=True)}
    assert chosen.height == 4
    a = by[("simplified", "a")]
    assert a["status"] == "ok" and a["candidate"] == 1 and a["failure_reason"] is None
    assert a["n_candidates"] == 3 and a["n_passed"] == 2
    b = by[("rewritten", "b")]
    # the best rejected candidate is the higher-quality one; its first reason is the sample's
    assert b["status"] == "rejected" and b["candidate"] == 1
    assert b["failure_reason"] == "verification: cut at the token limit" and b["n_passed"] == 0
    c = by[("extended", "c")]
    assert c["status"] == "failed" and c["failure_reason"] == "empty response"
    assert by[("extended", "d")]["candidate"] == 1


def test_choose_is_deterministic_and_handles_empty():
    rows = [cand("simplified", "a", i, q=6.0, la=1.0) for i in range(3)]
    assert choose_candidates(run(rows))["candidate"].to_list() == [0]
    empty = verify_candidates(pl.DataFrame([cand()]).clear(), TH)
    assert choose_candidates(empty).height == 0


def test_quality_value_modes():
    judge = np.array([2.0, 6.0, 10.0])
    ifd = np.array([1.2, 0.8, 0.4])
    np.testing.assert_allclose(quality_value(QualityScale("judge"), judge, None), judge)
    np.testing.assert_allclose(quality_value(QualityScale("ifd"), None, ifd), -ifd)
    scale = QualityScale.fit("combined", judge, ifd)
    v = quality_value(scale, judge, ifd)
    assert v[0] < v[1] < v[2] and math.isclose(float(v.mean()), 0.0, abs_tol=1e-12)
    # a candidate is measured on the round's scale, not its own
    one = quality_value(scale, np.array([6.0]), np.array([0.8]))
    assert math.isclose(float(one[0]), float(v[1]))
    with pytest.raises(ValueError):
        quality_value(QualityScale("nope"), judge, ifd)


def test_same_task_reads_content_words_and_answers():
    # a paraphrase that only adds words, or drops function words: the same task
    assert same_task(
        "In origami, what is a valley fold?", "x", "Please explain: in origami, what is a valley fold?", "y"
    )
    # the same template about another thing: another task
    assert not same_task(
        "In heraldry, what is the tincture called 'gules'?",
        "Gules is the heraldic name for red.",
        "In heraldry, what is the tincture called 'azure'?",
        "Azure is the heraldic name for blue.",
    )
    # reworded with other words but the same answer: the same task
    assert same_task("What does LBW stand for in cricket?", "Leg before wicket.", "Explain LBW.", "Leg before wicket.")
    # a prompt of function words only says nothing: counted as the same (the cosine decides)
    assert same_task("What is it?", "a", "Tell me about Rome.", "b")
    # short answers say nothing about which task they answer
    assert not same_task("Is 7 a prime number?", "Yes.", "Is 11 a prime number?", "Yes.")


def test_near_duplicate_rule_uses_the_same_task_cosine():
    row = cand(op="extended", cos=0.97) | {"max_cosine_same_task": None}
    assert run([row])["passed"][0]  # near only to other tasks
    row = cand(op="extended", cos=0.97) | {"max_cosine_same_task": 0.95}
    assert run([row])["reasons"][0] == "near-duplicate of a round sample"
    # a same-task sample counts from same_task_cosine (0.5), far below the cosine-alone 0.9:
    # a reworded paraphrase sits at 0.55-0.99 from its original
    row = cand(op="extended", cos=0.7) | {"max_cosine_same_task": 0.6}
    assert run([row])["reasons"][0] == "near-duplicate of a round sample"
    row = cand(op="extended", cos=0.7) | {"max_cosine_same_task": 0.45}
    assert run([row])["passed"][0]
    # duplicate_same_task off: the cosine alone, as before
    th = RoundThresholds(hard_before=2.0, hard_after=1.5, quality=5.0, duplicate_same_task=False)
    row = cand(op="extended", cos=0.97) | {"max_cosine_same_task": None}
    assert verify_candidates(pl.DataFrame([row]), th)["reasons"][0] == "near-duplicate of a round sample"
    # a stored table without the column: the cosine alone
    assert run([cand(op="extended", cos=0.97)])["reasons"][0] == "near-duplicate of a round sample"
    # no embedding stays its own reason
    row = cand(op="extended", cos=None) | {"max_cosine_same_task": None}
    assert run([row])["reasons"][0] == "no embedding"


def test_an_extension_must_be_a_new_task():
    """``new_task_gain`` above the margin (0 by default): each prompt explains its own answer
    better than the other's. At or below it the extension is its origin's task again (a
    paraphrase, or an answer neither prompt explains); not measured (null, or a table from
    before the column) the rule does not apply; it reads extensions only."""
    for gain, reason in [
        (0.3, None),
        (0.01, None),
        (0.0, "its origin's task again"),
        (-0.4, "its origin's task again"),
    ]:
        got = run([cand(op="extended", cos=0.7) | {"new_task_gain": gain}]).row(0, named=True)
        assert got["reasons"] == reason
    assert run([cand(op="extended", cos=0.7) | {"new_task_gain": None}])["passed"][0]
    assert run([cand(op="simplified") | {"new_task_gain": -1.0}])["passed"][0]  # a rewrite keeps the task
    th = RoundThresholds(hard_before=2.0, hard_after=1.5, quality=5.0, new_task=False)
    assert verify_candidates(pl.DataFrame([cand(op="extended", cos=0.7) | {"new_task_gain": -1.0}]), th)["passed"][0]
    th = RoundThresholds(hard_before=2.0, hard_after=1.5, quality=5.0, new_task_gain=0.5)
    got = verify_candidates(pl.DataFrame([cand(op="extended", cos=0.7) | {"new_task_gain": 0.3}]), th)
    assert got["reasons"][0] == "its origin's task again"
    # a near-duplicate of another round sample is its own reason, listed first
    row = cand(op="extended", cos=0.97) | {"max_cosine_same_task": 0.95, "new_task_gain": -0.2}
    assert run([row])["reasons"][0] == "near-duplicate of a round sample; its origin's task again"


def test_gate_round_reads_the_words_only_with_the_rounds_texts(monkeypatch):
    """Without the round's dataset there is nothing to read the task from: the near-duplicate
    rule falls back to the cosine alone (duplicate_cosine), never the same-task cut on it."""
    from middo_pipeline.core import gate

    ids = ["s0", "s1", "s2"]
    emb = np.eye(3, 4, dtype=np.float32).tolist()
    readouts = pl.DataFrame(
        {"sample_id": ids, "embedding": emb, "embedding_pooling": ["mean"] * 3, "embedding_layer": ["last"] * 3}
    )
    loss = pl.DataFrame(
        {
            "sample_id": ids,
            "loss_before": [1.0] * 3,
            "loss_after": [1.0] * 3,
            "threshold_loss_before": [2.0] * 3,
            "threshold_loss_after": [1.5] * 3,
        }
    )
    quality = pl.DataFrame(
        {
            "sample_id": ids,
            "quality_value": [-0.5] * 3,
            "quality_threshold": [-1.0] * 3,
            "quality_mode": ["ifd"] * 3,
            "judge_mean": [None] * 3,
            "judge_std": [None] * 3,
            "ifd_mean": [0.5] * 3,
            "ifd_std": [0.1] * 3,
        }
    )
    emb_sig = pl.DataFrame({"sample_id": ids, "knn_mean_similarity": [0.1] * 3, "top_components": [0] * 3})
    dataset = pl.DataFrame(
        {"sample_id": ids, "instruction": ["a", "b", "c"], "input": [""] * 3, "output": ["x", "y", "z"]}
    )
    seen = {}

    def fake_rescore(cands, **kw):
        seen["round_texts"] = kw["round_texts"]
        # near (0.7) to a sample by the cosine; that sample is not the same task
        return cands.with_columns(
            *(pl.lit(v).alias(k) for k, v in {"loss_before": 1.0, "loss_after": 1.0, "quality_value": 0.0}.items()),
            pl.lit(0.7).alias("max_cosine"),
            pl.lit(None, dtype=pl.Float64).alias("max_cosine_same_task"),
            pl.lit(0.9).alias("cosine_original"),
        )

    monkeypatch.setattr(gate, "rescore_candidates", fake_rescore)
    cands = pl.DataFrame([cand(op="extended", origin="s0")]).select(
        "origin_id",
        "operation",
        "candidate",
        "status",
        "failure_reason",
        "instruction_after",
        "output_after",
        "truncated",
    )
    kw = dict(
        model_readouts=readouts,
        loss_signals=loss,
        quality_signals=quality,
        embedding_signals=emb_sig,
        base=None,
        checkpoint=None,
    )
    verified, th = gate.gate_round(cands, round_dataset=dataset, **kw)
    assert th.duplicate_same_task and len(seen["round_texts"]) == 3
    assert verified["passed"][0]  # 0.7 to another task: not a duplicate
    verified, th = gate.gate_round(cands, **kw)  # no dataset: the cosine alone, at 0.9
    assert not th.duplicate_same_task and seen["round_texts"] is None
    assert verified["passed"][0]  # 0.7 < 0.9 (the same-task cut, 0.5, would have rejected it)
