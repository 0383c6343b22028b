"""Held-out evaluation: loading/validation, metrics, and multiple choice by log-likelihood."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from middo_pipeline.core import evaluation
from middo_pipeline.core.encoding import encode_samples
from middo_pipeline.core.evaluation import EVAL_SCHEMA, choose, evaluate, load_eval_set
from middo_pipeline.core.forward import ForwardResult, score_samples
from middo_pipeline.core.schema import make_sample_id, prompt_text
from middo_pipeline.models.loading import load_model
from middo_pipeline.models.tiny import build_tiny_model

ITEMS = [
    {
        "id": "mul",
        "instruction": "What is 12 times 7?",
        "input": "",
        "output": "12 times 7 is 84.",
        "choices": ["84", "19", "74", "96"],
        "answer_index": 0,
    },
    {
        "id": "cap",
        "instruction": "What is the capital of France?",
        "output": "Paris is the capital of France.",
        "choices": ["Lyon", "Paris", "Nice", "Lille"],
        "answer_index": 1,
    },
    {
        "id": "boil",
        "instruction": "Answer the question.",
        "input": "At what temperature does water boil?",
        "output": "Water boils at 100 degrees Celsius at sea level.",
        "choices": ["0 degrees", "50 degrees", "100 degrees", "1000 degrees"],
        "answer_index": 2,
    },
    {
        "instruction": "Classify the sentiment as positive or negative.",
        "input": "I love this quiet evening.",
        "output": "positive",
        "choices": ["negative", "neutral", "unknown", "positive"],
        "answer_index": 3,
    },
]


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    texts = [json.dumps(r) for r in ITEMS]
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-eval") / "model", texts=texts)
    return load_model(str(path), device="cpu", dtype="float32")


@pytest.fixture
def eval_file(tmp_path):
    return write_jsonl(tmp_path / "eval.jsonl", ITEMS, raw_lines=[""])  # a blank line is skipped


# ----------------------------------------------------------------------------------------------
# loading


def test_load_eval_set(eval_file):
    df = load_eval_set(eval_file)
    assert df.schema == pl.Schema(EVAL_SCHEMA)
    assert df.height == 4
    assert df["id"].to_list()[:3] == ["mul", "cap", "boil"]
    last = ITEMS[3]
    assert df["id"][3] == make_sample_id(last["instruction"], last["input"], last["output"])
    assert df["input"][1] == ""  # missing input
    assert df["choices"][2].to_list() == ITEMS[2]["choices"]
    assert df["answer_index"].to_list() == [0, 1, 2, 3]


BAD = [
    ("{not json", "<json>"),
    ('["a list"]', "<json>"),
    ({"instruction": "", "output": "o", "choices": ["a", "b", "c", "d"], "answer_index": 0}, "instruction"),
    ({"output": "o", "choices": ["a", "b", "c", "d"], "answer_index": 0}, "instruction"),
    ({"instruction": "i", "input": 3, "output": "o", "choices": ["a", "b", "c", "d"], "answer_index": 0}, "input"),
    ({"instruction": "i", "choices": ["a", "b", "c", "d"], "answer_index": 0}, "output"),
    ({"instruction": "i", "output": "o", "answer_index": 0}, "choices"),
    ({"instruction": "i", "output": "o", "choices": ["a", "b", "c"], "answer_index": 0}, "choices"),
    ({"instruction": "i", "output": "o", "choices": "abcd", "answer_index": 0}, "choices"),
    ({"instruction": "i", "output": "o", "choices": ["a", 2, "c", "d"], "answer_index": 0}, "choices"),
    ({"instruction": "i", "output": "o", "choices": ["a", "b", "c", "d"]}, "answer_index"),
    ({"instruction": "i", "output": "o", "choices": ["a", "b", "c", "d"], "answer_index": 4}, "answer_index"),
    ({"instruction": "i", "output": "o", "choices": ["a", "b", "c", "d"], "answer_index": "1"}, "answer_index"),
    ({"instruction": "i", "output": "o", "choices": ["a", "b", "c", "d"], "answer_index": True}, "answer_index"),
    ({"id": "mul", "instruction": "i", "output": "o", "choices": ["a", "b", "c", "d"], "answer_index": 1}, "id"),
]


@pytest.mark.parametrize("bad,field", BAD)
def test_bad_rows_name_file_line_and_field(tmp_path, bad, field):
    raw = bad if isinstance(bad, str) else json.dumps(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", ITEMS[:2], raw_lines=["", raw])  # the bad row is line 4
    with pytest.raises(ValueError) as err:
        load_eval_set(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:4: field {field!r}"), msg


def test_empty_or_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no items"):
        load_eval_set(empty)
    with pytest.raises(FileNotFoundError):
        load_eval_set(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------
# evaluation on the tiny model


def test_evaluate_tiny_model(lm, eval_file):
    df = load_eval_set(eval_file)
    calls = []
    res = evaluate(lm.model, lm.tokenizer, df, max_length=256, progress=lambda d, t: calls.append((d, t)))
    assert 0.0 <= res["mc_accuracy"] <= 1.0 and 0.0 <= res["mc_accuracy_sum_ll"] <= 1.0
    assert res["n_items"] == 4
    items = res["items"]
    assert isinstance(items, pl.DataFrame) and items.height == 4
    assert {"id", "correct", "chosen", "loss"} <= set(items.columns)
    assert items["id"].to_list() == df["id"].to_list()
    assert res["mc_accuracy"] == pytest.approx(items["correct"].mean())
    assert (items["correct"] == (items["chosen"] == items["answer_index"])).all()
    # the reference-output loss is score_samples over prompt -> output
    prompts = [prompt_text(i, x) for i, x in zip(df["instruction"], df["input"])]
    ref = score_samples(lm.model, lm.tokenizer, prompts, df["output"].to_list(), max_length=256)
    np.testing.assert_allclose(items["loss"].to_numpy(), ref.loss, atol=1e-5)
    assert res["mean_response_loss"] == pytest.approx(float(ref.loss.mean()), abs=1e-5)
    assert res["mean_response_loss"] > 0
    # the chosen choice is the one with the lowest mean response loss
    for row in items.iter_rows(named=True):
        assert row["chosen"] == int(np.argmin(row["choice_losses"]))
    assert calls and calls[-1] == (4 * 5, 4 * 5)  # references + 4 choices each, one batched call


def _fake_scores(losses_by_response: dict[str, float], tokens_by_response: dict[str, int] | None = None):
    """A stand-in for score_samples whose per-response loss we control."""

    def fake(model, tokenizer, prompts, responses, **kw):
        loss = np.array([losses_by_response.get(r, 1.0) for r in responses], dtype=np.float32)
        n = np.array([(tokens_by_response or {}).get(r, 3) for r in responses], dtype=np.int64)
        n[np.isnan(loss)] = 0
        return ForwardResult(loss=loss, n_response_tokens=n, embedding=None, n_tokens=int(n.sum()), seconds=0.01)

    return fake


def test_mc_accuracy_with_controlled_likelihoods(eval_file, monkeypatch):
    df = load_eval_set(eval_file)
    # item 0: right (84 has the lowest loss); item 1: wrong (Lyon wins); item 2: right;
    # item 3: the answer's loss is NaN (no scorable token) and must not win -> wrong
    losses = {
        "84": 0.5,
        "19": 2.0,
        "74": 2.0,
        "96": 2.0,
        "Lyon": 0.1,
        "Paris": 0.9,
        "Nice": 3.0,
        "Lille": 3.0,
        "0 degrees": 2.5,
        "50 degrees": 2.5,
        "100 degrees": 1.5,
        "1000 degrees": 2.5,
        "negative": 2.0,
        "neutral": 1.8,
        "unknown": 2.2,
        "positive": float("nan"),
    }
    monkeypatch.setattr(evaluation, "score_samples", _fake_scores(losses))
    res = evaluate(None, None, df)
    assert res["items"]["chosen"].to_list() == [0, 0, 2, 1]
    assert res["items"]["correct"].to_list() == [True, False, True, False]
    assert res["mc_accuracy"] == 0.5


def test_length_normalisation(eval_file, monkeypatch):
    """Mean token log-likelihood (normalised) and the plain sum can disagree: a long choice with a
    lower per-token loss wins under normalisation only."""
    df = load_eval_set(eval_file).head(1)  # answer: "84"
    losses = {"84": 1.0, "19": 1.5, "74": 3.0, "96": 3.0}
    tokens = {"84": 10, "19": 2, "74": 2, "96": 2}
    monkeypatch.setattr(evaluation, "score_samples", _fake_scores(losses, tokens))
    res = evaluate(None, None, df)
    assert res["mc_accuracy"] == 1.0  # -1.0 mean beats -1.5
    assert res["mc_accuracy_sum_ll"] == 0.0  # -10 sum loses to -3


def test_choose_ties_and_nan():
    loss = np.array([[1.0, 1.0, 2.0, 2.0], [np.nan, 3.0, np.nan, 4.0], [np.nan] * 4])
    assert choose(loss).tolist() == [0, 1, 0]


def test_trained_model_picks_the_trained_choice(lm, eval_file):
    """A tiny model trained a few steps on (prompt -> right choice) gets every item right."""
    import copy

    df = load_eval_set(eval_file)
    tok = lm.tokenizer
    model = copy.deepcopy(lm.model)
    prompts = [prompt_text(i, x) for i, x in zip(df["instruction"], df["input"])]
    right = [cs[a] for cs, a in zip(df["choices"].to_list(), df["answer_index"].to_list())]
    encs = encode_samples(tok, prompts, right, 256)
    width = max(len(e.input_ids) for e in encs)
    ids = torch.full((len(encs), width), tok.pad_token_id)
    labels = torch.full((len(encs), width), -100)
    mask = torch.zeros((len(encs), width), dtype=torch.long)
    for b, e in enumerate(encs):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[b, : len(e.input_ids)] = 1
        rs, re_ = e.response_span
        labels[b, rs:re_] = torch.tensor(e.input_ids[rs:re_])
    before = evaluate(model, tok, df, max_length=256)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = evaluate(model, tok, df, max_length=256)
    assert after["mc_accuracy"] == 1.0, (before["mc_accuracy"], after["items"])
    assert after["items"]["chosen"].to_list() == df["answer_index"].to_list()


def test_compare_rounds_pairs_items_and_says_when_worse():
    import polars as pl

    from middo_pipeline.core.evaluation import compare_rounds, paired_difference

    ids = [f"q{i}" for i in range(60)]
    prev = pl.DataFrame({"id": ids, "correct": [True] * 60, "loss": [1.0] * 60})
    # 30 of 60 items lost, loss up everywhere: significantly worse on both measures
    now = pl.DataFrame({"id": ids[::-1], "correct": [i % 2 == 0 for i in range(60)], "loss": [1.5] * 60})
    got = compare_rounds(prev, now)
    assert got["items"] == 60 and got["worse"]
    assert got["mc_accuracy"]["mean"] == -0.5 and got["mc_accuracy"]["ci95"][1] < 0
    assert got["response_loss"]["mean"] == -0.5  # previous − this: < 0 is worse
    same = compare_rounds(prev, prev)
    assert not same["worse"] and same["mc_accuracy"]["mean"] == 0
    assert compare_rounds(prev, now.with_columns(pl.lit("other").alias("id")).head(1))["items"] == 0
    noisy = paired_difference([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert noisy["mean"] == 0 and not noisy["significant"]


def _runs(rng, p_item, shift_sd, n_runs=5):
    """Correct/incorrect per run and item; every item of a run shares the run's shift (its
    training order), as the placebo measured."""
    shift = rng.normal(0.0, shift_sd, size=(n_runs, 1))
    return (rng.random((n_runs, p_item.size)) < np.clip(p_item + shift, 0, 1)).astype(float)


def test_runs_items_interval_holds_the_run_spread_that_an_item_interval_misses():
    from middo_pipeline.core.evaluation import paired_difference, runs_items_difference

    rng = np.random.default_rng(0)
    false_items = false_runs = 0
    sims = 60
    for k in range(sims):  # the null: two sets of runs of the same data, each run shifted by its order
        p = rng.random(240) * 0.6 + 0.2
        a, b = _runs(rng, p, 0.05), _runs(rng, p, 0.05)
        false_items += paired_difference(a.mean(0), b.mean(0), n_boot=400, seed=k)["significant"]
        got = runs_items_difference(a, b, n_boot=400, seed=k)
        false_runs += got["significant"]
        assert got["runs"] == [5, 5] and got["items"] == 240
        assert abs(got["mean"] - (a.mean() - b.mean())) < 1e-12
    assert false_runs <= 0.1 * sims  # about 5% by construction
    assert false_items >= 2 * max(false_runs, 1)  # the item interval calls order noise a difference
    # a real difference (every item 15 points likelier) is still found through that spread
    p = rng.random(240) * 0.5 + 0.2
    real = runs_items_difference(_runs(rng, p + 0.15, 0.02, 8), _runs(rng, p, 0.02, 8), n_boot=400)
    assert real["significant"] and real["ci95"][0] > 0
    # an item missing from one run is left out of both sides
    a, b = _runs(rng, p, 0.0), _runs(rng, p, 0.0)
    a[2, 7] = np.nan
    assert runs_items_difference(a, b)["items"] == 239
    assert runs_items_difference(a[:, :0], b[:, :0])["mean"] is None


def test_regression_check_says_what_it_cannot_see():
    from middo_pipeline.assets.evaluation import RESOLUTION, _regression_check
    from middo_pipeline.core.evaluation import compare_rounds

    ids = [f"q{i}" for i in range(60)]
    prev = pl.DataFrame({"id": ids, "correct": [True] * 60, "loss": [1.0] * 60})
    now = pl.DataFrame({"id": ids, "correct": [i % 2 == 0 for i in range(60)], "loss": [1.5] * 60})
    worse = _regression_check(compare_rounds(prev, now))
    assert not worse.passed and worse.severity.value == "WARN"
    assert worse.metadata["resolution"].value == RESOLUTION and "order" in RESOLUTION
    assert "significantly worse" in worse.metadata["note"].value
    assert "rolls its data back" in worse.metadata["note"].value
    assert worse.metadata["beyond_noise_floor"].value == "mc_accuracy, response_loss"
    # worse on every item by less than training order moves the loss: warned, not rolled back
    slightly = prev.with_columns(pl.lit(1.005).alias("loss"))
    small = _regression_check(compare_rounds(prev, slightly))
    assert not small.passed and small.metadata["beyond_noise_floor"].value == "no"
    assert "not rolled back" in small.metadata["note"].value
    assert _regression_check(compare_rounds(prev, prev)).passed
    assert _regression_check(None).passed  # round 1: nothing to compare with
