"""prompt_style auto: chosen by what the model can do; a round whose optimizer calls all fail says so."""

from __future__ import annotations

import polars as pl
import torch

from middo_pipeline.assets.refinement import optimizer_calls_check
from middo_pipeline.core.llm.protocol import Completion
from middo_pipeline.core.optimizer.operations import REFINED_SCHEMA
from middo_pipeline.core.optimizer.style import STEPWISE_MIN_PARAMS, choose_style


class _Served:
    """An HTTP-like backend (no model in this process) answering every call with ``reply``."""

    def __init__(self, reply: Completion):
        self.reply = reply
        self.calls = []

    def complete(self, requests, progress=None, on_result=None):
        self.calls.extend(requests)
        return [self.reply for _ in requests]


class _Local:
    def __init__(self, n_params: int):
        class M(torch.nn.Module):
            def parameters(self_inner, recurse=True):
                yield torch.empty(n_params, device="meta")

        self.loaded = type("LM", (), {"model": M()})()

    def complete(self, requests, progress=None, on_result=None):  # must not be probed
        raise AssertionError("a model of known size is not probed")


def test_small_served_model_gets_direct():
    # what a 135M model served by llama.cpp answers to a stepwise request: no final marker
    be = _Served(Completion(text="Sure! Here are three tips: drink water, sleep, walk."))
    style, why = choose_style(be)
    assert style == "direct" and "probe" in why and "no final prompt marker" in why
    assert len(be.calls) == 1 and be.calls[0].max_tokens >= 512


def test_capable_served_model_gets_stepwise():
    text = "The task is vague.\n\n### Final prompt\nList three practical, evidence-based habits for staying healthy."
    style, why = choose_style(_Served(Completion(text=text)))
    assert style == "stepwise" and "probe" in why


def test_failed_probe_falls_back_to_direct():
    style, why = choose_style(_Served(Completion(error="http 500")))
    assert style == "direct" and "http 500" in why


def test_known_size_decides_without_a_call():
    assert choose_style(_Local(135_000_000))[0] == "direct"
    assert choose_style(_Local(STEPWISE_MIN_PARAMS))[0] == "stepwise"


def test_cached_backend_is_unwrapped(tmp_path):
    from middo_pipeline.core.llm.cache import CachedBackend

    style, why = choose_style(CachedBackend(_Local(135_000_000), tmp_path / "c.sqlite"))
    assert style == "direct" and "135M" in why


def _candidates(statuses: list[str], reason: str = "unparseable: no final prompt marker") -> pl.DataFrame:
    rows = [
        {
            "origin_id": f"s{i}",
            "operation": "rewritten",
            "status": st,
            "failure_reason": None if st == "ok" else reason,
            "candidate": 0,
        }
        for i, st in enumerate(statuses)
    ]
    return pl.DataFrame(rows, schema={k: REFINED_SCHEMA[k] for k in rows[0]})


def test_all_failed_optimizer_calls_fail_the_check():
    check = optimizer_calls_check(_candidates(["failed"] * 10), "stepwise")
    assert not check.passed
    assert "ALL 10" in check.description and "no final prompt marker" in check.description
    assert check.metadata["generated"].value == 0


def test_some_generated_passes_and_nothing_planned_passes():
    assert optimizer_calls_check(_candidates(["failed", "ok", "failed"]), "direct").passed
    assert optimizer_calls_check(pl.DataFrame(schema=REFINED_SCHEMA), "direct").passed


def test_summary_prints_round_warnings(capsys):
    from middo_pipeline.cli import _print_rounds

    warning = "WARNING round-1: all 10 optimizer candidates failed (prompt style stepwise): nothing was refined"
    md = {"rows_in": 40, "step_seconds": {"train": 1.5, "gen": 0.5, "total": 3.0}, "warnings": [warning]}
    _print_rounds([("round-1", md)])
    out = capsys.readouterr().out
    assert warning in out and "seconds per step (wall)" in out
    assert out.splitlines()[0].split() == ["round", "rows_in"]  # the seconds have their own table
