"""The closed-loop benchmark's competent-optimizer stand-in (``benchmarks/standin.py``) and its
corrupted seed (``benchmarks/closed_loop.py``): it must understand the pipeline's own requests
as ``core.optimizer`` builds them, answer them as its contract says, and serve them over HTTP
to the real OpenAI backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import closed_loop, standin
from benchmarks.common import load_seed_rows
from middo_pipeline.core.optimizer.parsing import clean_response, parse_final_prompt
from middo_pipeline.core.optimizer.prompts import PromptConfig, operation_request, response_request
from middo_pipeline.core.schema import prompt_text
from middo_pipeline_tests.conftest import SEED_FILE

OPS = ("simplified", "rewritten", "extended")


def _body(req, seed=None) -> dict:
    """The request body the OpenAI backend sends for a ``ChatRequest`` (its prefill as a line)."""
    from middo_pipeline.core.llm.openai_compat import OpenAIBackend

    messages = OpenAIBackend._messages(None, req)
    return {"model": standin.MODEL_NAME, "messages": messages, "seed": req.seed if seed is None else seed}


@pytest.fixture(scope="module")
def corrupted():
    return closed_loop.build_corrupted(load_seed_rows(SEED_FILE))


def test_corrupted_seed_is_a_third_defective_with_known_good_versions(corrupted):
    rows = corrupted.rows
    defective = [r for r in rows if r["defect"] in ("quality", "hard")]
    assert 0.30 <= len(defective) / len(rows) <= 0.36
    kinds = {r["kind"] for r in defective}
    assert kinds == {
        "unrelated_response",
        "wrong_answer",
        "garbled_prompt",
        "truncated_prompt",
        "caesar",
        "reverse_words",
        "arithmetic",
        "reverse_chars",
    }
    assert all(r["good"] is not None for r in defective)
    assert all(r["good"] is not None for r in rows if r["defect"] == "isolated")
    assert len(corrupted.clean) == len(rows)
    # the clean counterpart differs exactly at the defective rows
    changed = sum(
        (c["instruction"], c["output"]) != (r["instruction"], r["output"]) for c, r in zip(corrupted.clean, rows)
    )
    assert changed == len(defective)
    # no repair copies the test: wrong-fact questions asked by a held-out set are not used
    grams, questions = closed_loop.heldout_grams()
    for r in rows:
        if r["kind"] == "wrong_answer":
            assert standin.norm(r["instruction"]).lower() not in questions
            assert not closed_loop._grams(r["good"]["output"]) & grams
    # the reserve holds no row of the data
    used = {standin.norm(r["instruction"]) for r in corrupted.clean}
    assert not {standin.norm(r["instruction"]) for r in corrupted.reserve} & used
    assert closed_loop.build_corrupted(load_seed_rows(SEED_FILE)).rows == rows  # seeded


@pytest.mark.parametrize("style", ["stepwise", "direct"])
@pytest.mark.parametrize("op", OPS)
def test_the_standin_reads_the_pipelines_own_requests(style, op, corrupted):
    row = next(r for r in corrupted.rows if r["input"]) if op != "extended" else corrupted.rows[0]
    source = prompt_text(row["instruction"], row["input"])
    req = operation_request(op, source, PromptConfig(style=style), ["a neighbour prompt", "another one"])
    stepwise = style == "stepwise"
    body = _body(req)
    got_op, got_source = standin.parse_request(body["messages"][-1]["content"], stepwise=stepwise)
    assert got_op == op
    assert standin.norm(got_source) == standin.norm(source)


def test_p1_answers_every_known_sample_with_its_good_version(corrupted):
    o = closed_loop.oracle(corrupted)
    s = standin.Standin(o, p=1.0, seed=3)
    cfg = PromptConfig(style="stepwise", max_prompt_tokens=768)
    for r in corrupted.rows:
        source = prompt_text(r["instruction"], r["input"])
        op = "extended" if r["defect"] == "isolated" else "simplified" if r["defect"] == "hard" else "rewritten"
        text, finish = s.complete(_body(operation_request(op, source, cfg, [])))
        # a wrong fact's or an unrelated answer's good version keeps the prompt (so does the pipeline)
        keeps = r["kind"] in ("wrong_answer", "unrelated_response")
        new_prompt, reason = parse_final_prompt(text, "stepwise", [] if keeps else [source])
        if r["good"] is None:  # a clean row: reworded lightly, its own answer kept
            assert s.decisions[-1]["kind"] == "neutral"
            continue
        assert s.decisions[-1]["kind"] == "good"
        assert standin.norm(new_prompt) == standin.norm(prompt_text(r["good"]["instruction"], r["good"]["input"]))
        response, finish = s.complete(_body(response_request(new_prompt, cfg)))
        assert (standin.norm(response), finish) == (standin.norm(r["good"]["output"]), "stop")


def test_p0_answers_only_failures_of_every_kind_and_is_seeded(corrupted):
    o = closed_loop.oracle(corrupted)
    cfg = PromptConfig(style="stepwise", max_prompt_tokens=768)

    def kinds(seed: int) -> list[str]:
        s = standin.Standin(o, p=0.0, seed=seed)
        for r in corrupted.rows:
            s.complete(_body(operation_request("rewritten", prompt_text(r["instruction"], r["input"]), cfg)))
        return [d["kind"] for d in s.decisions]

    got = kinds(0)
    assert set(got) == set(standin.FAILURES)
    assert kinds(0) == got
    assert kinds(1) != got


def test_failures_look_like_what_they_claim(corrupted):
    o = closed_loop.oracle(corrupted)
    s = standin.Standin(o, p=0.0, seed=0)
    cfg = PromptConfig(style="stepwise", max_prompt_tokens=768)
    seen = set()
    for r in corrupted.rows:
        if r["good"] is None or r["defect"] == "isolated":
            continue
        source = prompt_text(r["instruction"], r["input"])
        text, _ = s.complete(_body(operation_request("rewritten", source, cfg)))
        kind = s.decisions[-1]["kind"]
        new_prompt, reason = parse_final_prompt(text, "stepwise", [])
        if kind == "unchanged":
            assert standin.norm(new_prompt) == standin.norm(source)
            response, _ = s.complete(_body(response_request(new_prompt, cfg)))
            assert standin.norm(response) == standin.norm(r["output"])
            seen.add(kind)
            continue
        if kind == "refusal" and new_prompt is None:
            assert reason == "refusal"
            seen.add(kind)
            continue
        response, finish = s.complete(_body(response_request(new_prompt, cfg)))
        good = r["good"]
        if kind == "truncated":
            assert finish == "length" and len(response) < len(good["output"])
        elif kind == "wrong_answer":
            assert standin.norm(new_prompt) == standin.norm(prompt_text(good["instruction"], good["input"]))
            assert standin.norm(response) != standin.norm(good["output"])
        elif kind == "off_topic":
            assert standin.norm(new_prompt) not in (
                standin.norm(prompt_text(good["instruction"], good["input"])),
                standin.norm(source),
            )
        elif kind == "reworded_origin":
            assert standin.norm(response) == standin.norm(r["output"])
        elif kind == "refusal":  # the pleasantry before the answer
            assert response.startswith("Absolutely!")
        seen.add(kind)
    assert seen == set(standin.FAILURES)


def test_served_over_http_to_the_real_backend_the_probe_chooses_stepwise(corrupted, tmp_path):
    from middo_pipeline.core.llm import make_backend
    from middo_pipeline.core.optimizer.style import choose_style

    server = standin.StandinServer(standin.Standin(closed_loop.oracle(corrupted), p=1.0)).start()
    try:
        env = server.env()
        backend = make_backend(
            "openai", cache=None, base_url=env["MIDDO_OPTIMIZER_BASE_URL"], model=env["MIDDO_OPTIMIZER_MODEL"]
        )
        style, why = choose_style(backend)
        assert style == "stepwise", why
        r = next(r for r in corrupted.rows if r["kind"] == "wrong_answer")
        source = prompt_text(r["instruction"], r["input"])
        cfg = PromptConfig(style="stepwise", max_prompt_tokens=768)
        first = backend.complete([operation_request("rewritten", source, cfg)])[0]
        assert first.ok and first.usage["completion_tokens"] == len(first.text.split())
        new_prompt, _ = parse_final_prompt(first.text, "stepwise", [])  # the question is kept
        second = backend.complete([response_request(new_prompt, cfg)])[0]
        assert clean_response(second.text)[0] == r["good"]["output"]
    finally:
        server.stop()


@pytest.mark.slow
def test_two_rounds_through_middo_loop_accept_known_good_answers_and_no_junk(tmp_path):
    """``middo loop --rounds 2`` with the openai backend pointed at the stand-in (p = 0.5): the
    style probe picks stepwise, ``auto`` picks the method's bar, good answers repair defective
    rows in both rounds, and none of the stand-in's bad answers gets in. The base model is a tiny
    Llama that has learnt the clean data (``closed_loop.tiny_knower``), so the gate judges for
    real: a random tiny model would reject or accept by chance."""
    seed_rows = load_seed_rows(SEED_FILE)
    cs = closed_loop.build_corrupted(seed_rows, n_clean=24, n_quality=12, n_hard=8, n_isolated=4)
    base = closed_loop.tiny_knower(tmp_path / "model", cs)
    seed = tmp_path / "corrupted.json"
    seed.write_text(json.dumps(cs.seed_json()))
    config = tmp_path / "run.yaml"
    config.write_text(
        "ops:\n  sft_checkpoint:\n    config: {max_length: 192, batch_size: 8}\n"
        "  model_readouts:\n    config: {max_length: 192}\n  embedding_signals:\n    config: {umap: false}\n"
        "  round_evaluation:\n    config: {max_length: 128}\n"
        "  optimized_dataset:\n    config: {unrepaired: quarantine}\n"
    )
    server = standin.StandinServer(standin.Standin(closed_loop.oracle(cs), p=0.5, seed=0)).start()
    try:
        env = {**server.env(), "MIDDO_PROFILE": "tiny", "MIDDO_BASE_MODEL": str(base), "MIDDO_DEVICE": "cpu"}
        res = closed_loop.run_loop(tmp_path / "loop", seed, 2, env_extra=env, config_file=config)
        assert res["exit_code"] == 0, Path(res["log"]).read_text()[-3000:]
        reports = [closed_loop.round_report(tmp_path / "loop", f"round-{r}", cs, server.decisions) for r in (1, 2)]
    finally:
        server.stop()
    for rep in reports:
        assert rep["prompt_style"] == "stepwise" and "probe" in rep["prompt_style_reason"]
        assert rep["acceptance_bar"] == "flag"
        assert rep["standin_bad_answers"] > 0  # junk was offered ...
        assert rep["junk_accepted"] == 0, rep["accepted_by_answer"]  # ... and none of it got in
        assert "unknown" not in rep["accepted_by_answer"]  # every accepted row is a stand-in answer
        assert rep["repaired"] >= 1, rep["accepted_by_answer"]  # known good versions got in
        assert rep["rows_out"] == rep["rows_in"] + rep["rows_added"] - rep["rows_removed"]
    # round 2 starts from round 1's data, with its repairs in it
    assert reports[1]["rows_in"] == reports[0]["rows_out"]
    assert sum(reports[1]["defects_in"].values()) < sum(reports[0]["defects_in"].values())
    # unrepaired: quarantine took the samples whose fixes the gate refused out of round 2's data,
    # kept them whole with the reason, and middo export --quarantined writes them
    import polars as pl

    from middo_pipeline.cli import main as middo
    from middo_pipeline.core.storage import Storage

    store = Storage(tmp_path / "loop" / "middo")
    q = pl.read_parquet(store.table_path("unrepaired_samples", "round-1"))
    refined = pl.read_parquet(store.table_path("refined_samples", "round-1"))
    refused = refined.filter(pl.col("operation").is_in(["simplified", "rewritten"]) & (pl.col("status") == "rejected"))
    assert q.height == refused.height > 0
    assert set(q["sample_id"]) == set(refused["origin_id"])
    assert all(r.startswith("verification") for r in q["reason"])
    round2 = pl.read_parquet(store.table_path("round_dataset", "round-2"))
    assert not set(q["sample_id"]) & set(round2["sample_id"])
    acc = pl.read_parquet(store.table_path("sample_accounting", "round-1"))
    assert acc.filter(pl.col("fate").str.starts_with("quarantined")).height == q.height
    assert reports[0]["optimized_metadata"]["quarantined"] == q.height
    out = tmp_path / "quarantined.jsonl"
    env = {"DAGSTER_HOME": str(tmp_path / "loop" / "dagster_home"), "MIDDO_HOME": str(store.root)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert middo(["export", "--round", "1", "--quarantined", "--out", str(out)]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(e["instruction"] for e in exported) == sorted(q["instruction"])
