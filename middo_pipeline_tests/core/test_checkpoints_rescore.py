"""A checkpoint knows what it was trained on; candidates are re-scored like the round's samples."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pytest

from middo_pipeline.core.checkpoints import (
    ROUND_INFO,
    StaleCheckpoint,
    copy_checkpoint,
    find_identical,
    read_round_info,
    require_checkpoint,
    trained_from,
    training_key,
    write_round_info,
)


def test_require_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(FileNotFoundError, match="materialize sft_checkpoint first"):
        require_checkpoint(ck, "round-1", "abc")
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    with pytest.raises(StaleCheckpoint, match="does not record"):
        require_checkpoint(ck, "round-1", "abc")
    write_round_info(ck, round_key="round-1", base_model="m", initialized_from=None, trained_on="abc", samples=3)
    assert require_checkpoint(ck, "round-1", "abc")["samples"] == 3
    assert trained_from(ck) is None
    with pytest.raises(StaleCheckpoint, match="another round_dataset"):
        require_checkpoint(ck, "round-1", "xyz")
    (ck / ROUND_INFO).write_text("not json")
    with pytest.raises(StaleCheckpoint):
        require_checkpoint(ck, "round-1", "abc")
    write_round_info(ck, round_key="round-2", base_model="m", initialized_from="/prev", trained_on="abc", samples=3)
    assert trained_from(ck) == "/prev" and json.loads((ck / ROUND_INFO).read_text())["round"] == "round-2"


def test_training_key_changes_with_everything_that_decides_the_weights(monkeypatch):
    import middo_pipeline.core.checkpoints as checkpoints

    base = dict(trained_on="abc", settings={"seed": 0, "learning_rate": 2e-4}, base_model="id1")
    key = training_key(**base)
    # our training code changed (the package version does not move with every commit)
    with monkeypatch.context() as m:
        m.setattr(checkpoints, "source_digest", lambda *files: "edited")
        assert training_key(**base) != key
    assert checkpoints.source_digest(*checkpoints.TRAINING_CODE) == checkpoints.source_digest(
        *checkpoints.TRAINING_CODE
    )
    assert key == training_key(**base) and len(key) == 24
    for change in (
        {"trained_on": "abd"},  # other rows, or the same rows in another order (the fingerprint is ordered)
        {"settings": {"seed": 1, "learning_rate": 2e-4}},
        {"settings": {"seed": 0, "learning_rate": 1e-4}},
        {"base_model": "id2"},
        {"init_from": "/ck/round-1", "init_key": "k1"},
    ):
        assert training_key(**(base | change)) != key, change
    assert training_key(**base, init_from="/ck/round-1", init_key="k1") != training_key(
        **base, init_from="/ck/round-1", init_key="k2"
    )
    # a start checkpoint that records no key: never reusable
    assert training_key(**base, init_from="/ck/round-1", init_key=None) is None


def test_find_identical_and_copy(tmp_path):
    r1, r2, r3 = (tmp_path / f"round-{n}" for n in (1, 2, 3))
    for folder, key in ((r1, "k1"), (r2, "k2")):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights of " + key.encode())
        (folder / "sub").mkdir()
        (folder / "sub" / "x.txt").write_text(key)
        write_round_info(
            folder,
            round_key=folder.name,
            base_model="m",
            initialized_from=None,
            trained_on="f",
            samples=1,
            training_key=key,
        )
    rounds = [("round-2", r2), ("round-1", r1)]  # newest first
    assert find_identical(rounds, "k1") == ("round-1", r1)
    assert find_identical(rounds, "k2") == ("round-2", r2)
    assert find_identical(rounds, "k3") is None and find_identical(rounds, None) is None
    (r2 / "config.json").unlink()  # not a loadable checkpoint: not a match
    assert find_identical(rounds, "k2") is None

    copy_checkpoint(r1, r3)
    assert (r3 / "model.safetensors").read_bytes() == b"weights of k1" and (r3 / "sub" / "x.txt").read_text() == "k1"
    assert not (r3 / ROUND_INFO).exists()  # the caller writes its own
    # even a round info linked to the source's is replaced, never edited in place
    os.link(r1 / ROUND_INFO, r3 / ROUND_INFO)
    write_round_info(
        r3,
        round_key="round-3",
        base_model="m",
        initialized_from=None,
        trained_on="f",
        samples=1,
        training_key="k1",
        reused_from="round-1",
    )
    assert read_round_info(r3)["reused_from"] == "round-1"
    assert read_round_info(r1)["round"] == "round-1" and "reused_from" not in read_round_info(r1)


def test_rescore_candidates_matches_direct_scoring(tiny_model_dir):
    from middo_pipeline.core.diversity import TopComponents
    from middo_pipeline.core.forward import EmbeddingSpec, score_samples
    from middo_pipeline.core.ifd import ifd_scores, unconditional_loss
    from middo_pipeline.core.neighbours import max_cosine_to
    from middo_pipeline.core.rescore import RescoreSettings, rescore_candidates
    from middo_pipeline.core.verify import QualityScale
    from middo_pipeline.models.loading import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    cands = pl.DataFrame(
        {
            "origin_id": ["a", "b", "c"],
            "operation": ["simplified", "rewritten", "extended"],
            "candidate": [0, 0, 1],
            "status": ["ok", "failed", "ok"],
            "instruction_after": ["Add 2 and 3.", None, "Name a blue fruit."],
            "input_after": ["", None, ""],
            "output_after": ["5", None, "A blueberry."],
        }
    )
    rng = np.random.default_rng(0)
    round_emb = rng.normal(size=(6, lm.model.config.hidden_size)).astype(np.float32)
    comps = TopComponents(1).fit(round_emb)
    spec = EmbeddingSpec(pooling="last", layer="middle")
    for mode in ("ifd", "judge"):
        scale = QualityScale.fit(mode, np.array([4.0, 6.0]), np.array([0.5, 0.9]))
        got = rescore_candidates(
            cands,
            base=lm,
            checkpoint=lm,
            scale=scale,
            round_embeddings=comps.transform(round_emb),
            components=comps,
            settings=RescoreSettings(embedding=spec, judge_max_length=448),
            round_ids=["x", "c", "y", "a", "z", "w"],  # origin "a" is row 3, "c" row 1
            # no round sample is either candidate's task
            round_texts=[("Subtract 3 from 9.", "6")] * 6 if mode == "judge" else None,
        )
        assert got.height == 3 and got["origin_id"].to_list() == ["a", "b", "c"]
        assert got.row(1, named=True)["loss_before"] is None  # not generated: nothing scored
        prompts, responses = ["Add 2 and 3.", "Name a blue fruit."], ["5", "A blueberry."]
        direct = score_samples(lm.model, lm.tokenizer, prompts, responses, embedding=spec)
        uncond = unconditional_loss(lm.model, lm.tokenizer, responses)
        ok = got.filter(pl.col("status") == "ok")
        np.testing.assert_allclose(ok["loss_after"].to_numpy(), direct.loss, atol=1e-5)
        np.testing.assert_allclose(ok["ifd"].to_numpy(), ifd_scores(direct.loss, uncond.loss), atol=1e-5)
        np.testing.assert_allclose(
            ok["max_cosine"].to_numpy(),
            max_cosine_to(comps.transform(direct.embedding), comps.transform(round_emb)),
            atol=1e-5,
        )
        mapped, rows = comps.transform(direct.embedding), comps.transform(round_emb)
        unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
        if mode == "ifd":  # no round texts: every near sample counts, as before
            np.testing.assert_allclose(ok["max_cosine_same_task"].to_numpy(), ok["max_cosine"].to_numpy())
        else:  # none of the round samples is the same task: null
            assert ok["max_cosine_same_task"].null_count() == 2
        np.testing.assert_allclose(
            ok["cosine_original"].to_numpy(),
            [unit(mapped[0]) @ unit(rows[3]), unit(mapped[1]) @ unit(rows[1])],
            atol=1e-5,
        )
        if mode == "ifd":
            np.testing.assert_allclose(ok["quality_value"].to_numpy(), -ok["ifd"].to_numpy())
            assert ok["judge_score"].null_count() == 2  # the judge does not run in ifd mode
        else:
            assert ok["judge_score"].null_count() == 0
            np.testing.assert_allclose(ok["quality_value"].to_numpy(), ok["judge_score"].to_numpy())


def test_rescore_measures_new_task_and_repair_gains(tiny_model_dir):
    """For an extension with its origin's texts, ``new_task_gain``: the smaller of (its answer
    under the origin's prompt - under its own) and (the origin's answer under its prompt - under
    the origin's), base model. For a simplification or rewrite, ``repair_gain``: the origin's
    answer under the better of the origin's prompt and no prompt - under the candidate's (0
    when the prompt is unchanged); ``prompt_fluency_gain``: the prompts' prompt-free losses.
    Each null for the other operations and for a candidate without its origin's texts."""
    from middo_pipeline.core.diversity import TopComponents
    from middo_pipeline.core.forward import score_samples
    from middo_pipeline.core.ifd import unconditional_loss
    from middo_pipeline.core.rescore import rescore_candidates
    from middo_pipeline.core.verify import QualityScale
    from middo_pipeline.models.loading import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    cands = pl.DataFrame(
        {
            "origin_id": ["a", "b", "c", "a", "d", "e"],
            "operation": ["extended", "simplified", "extended", "extended", "rewritten", "rewritten"],
            "candidate": [0, 0, 0, 1, 0, 0],
            "status": ["ok"] * 6,
            "instruction_after": [
                "Name a blue fruit.",
                "Add 2 and 3.",
                "Name a red fruit.",
                "Name a yellow fruit.",
                "Name a green vegetable.",
                "Name a fruit.",
            ],
            "input_after": [""] * 6,
            "output_after": ["A blueberry.", "5", "A cherry.", "A banana.", "Kale.", "An apple."],
            "instruction_before": [
                "Name a green vegetable.",
                "Add two and three, then say why.",
                None,
                "Name a green vegetable.",
                "Name a green vegetable.",
                None,
            ],
            "input_before": ["", "", None, "", "", None],
            "output_before": ["Spinach.", "5, because 2 + 3 = 5.", None, "Spinach.", "Spinach.", None],
        }
    )
    rng = np.random.default_rng(0)
    round_emb = rng.normal(size=(4, lm.model.config.hidden_size)).astype(np.float32)
    comps = TopComponents(1).fit(round_emb)
    kw = dict(
        base=lm,
        checkpoint=lm,
        scale=QualityScale.fit("ifd", np.array([4.0, 6.0]), np.array([0.5, 0.9])),
        round_embeddings=comps.transform(round_emb),
        components=comps,
    )
    got = rescore_candidates(cands, **kw)
    off = rescore_candidates(cands, new_task=False, repair=False, **kw)
    assert off["new_task_gain"].null_count() == off["repair_gain"].null_count() == 6  # rules off: not read
    assert off["prompt_fluency_gain"].null_count() == 6
    gain = got["new_task_gain"].to_list()
    assert gain[1] is None and gain[2] is None and gain[4] is None  # not an extension; no origin texts
    p_c, a_c, p_o, a_o = "Name a blue fruit.", "A blueberry.", "Name a green vegetable.", "Spinach."
    loss = score_samples(lm.model, lm.tokenizer, [p_c, p_o, p_c, p_o], [a_c, a_c, a_o, a_o], with_embeddings=False).loss
    want = min(loss[1] - loss[0], loss[2] - loss[3])
    assert gain[0] == pytest.approx(want, abs=1e-5)
    assert got["loss_before"][0] == pytest.approx(loss[0], abs=1e-5)
    # a second candidate of the same origin: the origin's own loss is read once, and shared
    p_y, a_y = "Name a yellow fruit.", "A banana."
    loss = score_samples(lm.model, lm.tokenizer, [p_y, p_o, p_y, p_o], [a_y, a_y, a_o, a_o], with_embeddings=False).loss
    assert gain[3] == pytest.approx(min(loss[1] - loss[0], loss[2] - loss[3]), abs=1e-5)
    fix = got["repair_gain"].to_list()
    assert fix[0] is None and fix[2] is None and fix[3] is None and fix[5] is None  # extensions; no origin texts
    assert fix[4] == 0.0  # the prompt is unchanged: it explains the answer no better
    p_c, p_o, a_o = "Add 2 and 3.", "Add two and three, then say why.", "5, because 2 + 3 = 5."
    loss = score_samples(lm.model, lm.tokenizer, [p_o, p_c], [a_o, a_o], with_embeddings=False).loss
    free = unconditional_loss(lm.model, lm.tokenizer, [p_o, p_c, a_o]).loss
    # better than the origin's prompt and than no prompt: the smaller of the two, minus its own
    assert fix[1] == pytest.approx(min(loss[0], free[2]) - loss[1], abs=1e-5)
    # how much more fluently the candidate's prompt reads: the prompt-free loss of each prompt
    fluent = got["prompt_fluency_gain"].to_list()
    assert fluent[4] == 0.0 and fluent[0] is None and fluent[5] is None
    assert fluent[1] == pytest.approx(free[0] - free[1], abs=1e-5)


def test_rescore_cascade_reads_no_further_what_the_base_model_rejects(tiny_model_dir):
    """With ``early_reject``, a candidate it rejects on its base-model readings keeps those
    (the same values as without the cascade) and nothing more: no cross-prompt pass, no
    checkpoint pass (counted: only the others reach the checkpoint), ``gate_stage`` base. The
    others are read in full, with the same values as without the cascade."""
    from middo_pipeline.core.distributed import LocalForward
    from middo_pipeline.core.diversity import TopComponents
    from middo_pipeline.core.rescore import rescore_candidates
    from middo_pipeline.core.verify import QualityScale
    from middo_pipeline.models.loading import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    cands = pl.DataFrame(
        {
            "origin_id": ["a", "b", "c", "d"],
            "operation": ["extended", "simplified", "rewritten", "simplified"],
            "candidate": [0, 0, 0, 0],
            "status": ["ok", "ok", "ok", "failed"],
            "instruction_after": ["Name a blue fruit.", "Add 2 and 3.", "Name a fruit.", None],
            "input_after": ["", "", "", None],
            "output_after": ["A blueberry.", "5", "An apple.", None],
            "instruction_before": ["Name a green vegetable.", "Add two and three.", "Name fruit", "x"],
            "input_before": ["", "", "", ""],
            "output_before": ["Spinach.", "5", "A pear.", "y"],
        }
    )
    rng = np.random.default_rng(0)
    round_emb = rng.normal(size=(4, lm.model.config.hidden_size)).astype(np.float32)
    comps = TopComponents(1).fit(round_emb)
    reached = []

    class Counted(LocalForward):
        def score_samples(self, prompts, responses, **kw):
            if kw.get("with_embeddings"):
                reached.extend(prompts)
            return super().score_samples(prompts, responses, **kw)

    kw = dict(
        base=lm,
        scale=QualityScale.fit("ifd", np.array([4.0, 6.0]), np.array([0.5, 0.9])),
        round_embeddings=comps.transform(round_emb),
        components=comps,
    )
    full = rescore_candidates(cands, checkpoint=lambda: Counted(lm), **kw)
    assert sorted(reached) == sorted(["Name a blue fruit.", "Add 2 and 3.", "Name a fruit."])
    assert full["gate_stage"].to_list() == ["full", "full", "full", None]
    reached.clear()
    seen = []

    def reject_simplified(row):  # called with the base-model readings only
        seen.append(row)
        return row["operation"] == "simplified"

    got = rescore_candidates(cands, checkpoint=lambda: Counted(lm), early_reject=reject_simplified, **kw)
    assert len(seen) == 3 and all(r["loss_after"] is None and r["ifd"] is not None for r in seen)
    assert all(r["quality_value"] == pytest.approx(-r["ifd"]) for r in seen)  # ifd mode: known
    assert sorted(reached) == sorted(["Name a blue fruit.", "Name a fruit."])  # not the settled one
    assert got["gate_stage"].to_list() == ["full", "base", "full", None]
    settled = got.row(1, named=True)
    for col in ("loss_before", "loss_unconditional", "ifd", "quality_value"):
        assert settled[col] == pytest.approx(full[col][1], abs=1e-6)
    for col in ("loss_after", "max_cosine", "cosine_original", "repair_gain", "prompt_fluency_gain"):
        assert settled[col] is None
    for col in ("loss_before", "loss_after", "ifd", "max_cosine", "new_task_gain", "repair_gain"):
        np.testing.assert_allclose(
            got[col].gather([0, 2]).to_numpy().astype(float),
            full[col].gather([0, 2]).to_numpy().astype(float),
            atol=1e-5,
        )


def test_max_cosine_same_task_reads_the_nearest_samples_words():
    from middo_pipeline.core import rescore

    round_emb = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    texts = [
        ("In origami, what is a valley fold?", "It folds the paper towards you."),
        ("Please tell me: in origami, what is a mountain fold?", "It folds the paper away from you."),
        ("Name a blue fruit.", "A blueberry."),
    ]
    emb = np.array([[0.99, 0.1], [0.1, 0.99]])
    prompts = ["In origami, what is a mountain fold?", "Name one fruit that is blue."]
    responses = ["A fold away from you, like a peak.", "A blueberry."]
    got = rescore._max_cosine_same_task(emb, round_emb, prompts, responses, texts)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    # the first: nearest is the valley fold (another task), next the mountain fold (same words)
    assert got[0] == pytest.approx(unit[0] @ round_emb[1])
    # the second: the blue fruit reworded, same answer
    assert got[1] == pytest.approx(unit[1] @ round_emb[2])
    # none of the nearest is the same task: null
    other = [("Sing a song.", "La la.")] * 3
    assert np.isnan(rescore._max_cosine_same_task(emb, round_emb, prompts, responses, other)).all()
    # only the SAME_TASK_NEAREST nearest are read: a same-task sample beyond them is not
    far = np.vstack([np.repeat(emb[1:], 16, axis=0), [[-1.0, 0.0]]])
    far_texts = [("Sing a song.", "La la.")] * 16 + [texts[2]]
    assert rescore.SAME_TASK_NEAREST == 16
    assert np.isnan(rescore._max_cosine_same_task(emb[1:], far, prompts[1:], responses[1:], far_texts)).all()
    near = np.vstack([np.repeat(emb[1:], 15, axis=0), [[0.0, 1.0]]])  # the 16th nearest: read
    found = rescore._max_cosine_same_task(emb[1:], near, prompts[1:], responses[1:], far_texts[1:])
    assert found[0] == pytest.approx(unit[1] @ np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="round texts"):
        rescore._max_cosine_same_task(emb, round_emb, prompts, responses, texts[:2])
