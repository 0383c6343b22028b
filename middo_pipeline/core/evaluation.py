"""Held-out evaluation of a checkpoint: response loss and multiple-choice accuracy.

The held-out set is JSONL, one item per line::

    {"id": "opt", "instruction": "...", "input": "...", "output": "reference answer",
     "choices": ["A", "B", "C", "D"], "answer_index": 2}

``id`` is optional (default: the content hash ``schema.make_sample_id``); ``input`` may be
missing, null or "".

Metrics (``evaluate``):

- ``mean_response_loss``: the per-item mean token cross-entropy of the reference ``output``
  given the prompt (``forward.score_samples``), averaged over items (each item counts once;
  ``token_mean_response_loss`` weights by tokens instead).
- ``mc_accuracy``: multiple choice by log-likelihood. Each choice is scored as the assistant
  response to the item's prompt; its score is the SUM of the token log-likelihoods of the
  choice tokens (the end-of-turn token included, as in training) divided by their number,
  i.e. the mean token log-likelihood = minus the response loss. Normalising by length keeps
  long choices from losing just for having more tokens. The highest score is the model's
  choice (ties: the lowest index); a choice with no scorable token (cut by ``max_length``)
  scores −inf. ``mc_accuracy_sum_ll`` reports the unnormalised (sum) variant beside it.
  All choices of all items, and the reference outputs, go through one batched
  ``score_samples`` call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import polars as pl

from middo_pipeline.constants import MAX_LENGTH
from middo_pipeline.core.forward import score_samples
from middo_pipeline.core.schema import make_sample_id, prompt_text

__all__ = [
    "N_CHOICES",
    "EVAL_SCHEMA",
    "METRICS",
    "load_eval_set",
    "evaluate",
    "choose",
    "paired_difference",
    "compare_rounds",
    "metrics_by_round",
]

N_CHOICES = 4
METRICS = ("mean_response_loss", "mc_accuracy")  # the figures a round's evaluation records
# the per-item table ``evaluate`` returns (round_evaluation's table)
ITEMS_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String,
    "correct": pl.Boolean,
    "chosen": pl.Int64,
    "answer_index": pl.Int64,
    "loss": pl.Float32,
    "n_response_tokens": pl.Int64,
    "choice_losses": pl.List(pl.Float32),
}
EVAL_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String,
    "instruction": pl.String,
    "input": pl.String,
    "output": pl.String,
    "choices": pl.List(pl.String),
    "answer_index": pl.Int64,
}


def _bad(path: Path, line: int, field: str, reason: str) -> ValueError:
    return ValueError(f"{path}:{line}: field {field!r}: {reason}")


def _text(rec: dict, path: Path, line: int, field: str, *, required: bool) -> str:
    v = rec.get(field)
    if v is None:
        if required:
            raise _bad(path, line, field, "missing")
        return ""
    if not isinstance(v, str):
        raise _bad(path, line, field, f"must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise _bad(path, line, field, "is blank")
    return v


def load_eval_set(path: str | Path) -> pl.DataFrame:
    """Read and validate a held-out JSONL file (columns: ``EVAL_SCHEMA``).

    Any bad row raises ``ValueError("<file>:<line>: field '<name>': <reason>")``; blank lines
    are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"held-out eval set not found: {path}")
    rows: list[dict] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _bad(path, line_no, "<json>", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise _bad(path, line_no, "<json>", f"expected an object, got {type(rec).__name__}")
            instruction = _text(rec, path, line_no, "instruction", required=True)
            input_ = _text(rec, path, line_no, "input", required=False)
            output = _text(rec, path, line_no, "output", required=True)
            choices = rec.get("choices")
            if choices is None:
                raise _bad(path, line_no, "choices", "missing")
            if not isinstance(choices, list) or len(choices) != N_CHOICES:
                got = f"{len(choices)} items" if isinstance(choices, list) else type(choices).__name__
                raise _bad(path, line_no, "choices", f"must be a list of {N_CHOICES} strings, got {got}")
            for j, c in enumerate(choices):
                if not isinstance(c, str) or not c.strip():
                    raise _bad(path, line_no, "choices", f"choice {j} must be a non-blank string, got {c!r}")
            ans = rec.get("answer_index")
            if ans is None:
                raise _bad(path, line_no, "answer_index", "missing")
            if isinstance(ans, bool) or not isinstance(ans, int):
                raise _bad(path, line_no, "answer_index", f"must be an integer, got {ans!r}")
            if not 0 <= ans < len(choices):
                raise _bad(path, line_no, "answer_index", f"{ans} is out of range 0..{len(choices) - 1}")
            rid = rec.get("id")
            if rid is None:
                rid = make_sample_id(instruction, input_, output)
            elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
                raise _bad(path, line_no, "id", f"must be a non-blank string or integer, got {rid!r}")
            rid = str(rid)
            if rid in seen:
                raise _bad(path, line_no, "id", f"duplicate id {rid!r} (first on line {seen[rid]})")
            seen[rid] = line_no
            rows.append(
                {
                    "id": rid,
                    "instruction": instruction,
                    "input": input_,
                    "output": output,
                    "choices": list(choices),
                    "answer_index": ans,
                }
            )
    if not rows:
        raise ValueError(f"{path}: no items (the held-out eval set is empty)")
    return pl.DataFrame(rows, schema=EVAL_SCHEMA)


def choose(choice_loss: np.ndarray, choice_tokens: np.ndarray | None = None, *, normalize: bool = True) -> np.ndarray:
    """The chosen index per row of a (items, choices) loss matrix.

    normalize=True: highest mean token log-likelihood (= lowest mean loss);
    normalize=False: highest SUM log-likelihood (needs ``choice_tokens``).
    NaN (no scorable token) never wins; ties go to the lowest index.
    """
    score = -np.asarray(choice_loss, dtype=np.float64)
    if not normalize:
        if choice_tokens is None:
            raise ValueError("the sum variant needs the token counts")
        score = score * np.asarray(choice_tokens, dtype=np.float64)
    score = np.where(np.isfinite(score), score, -np.inf)
    return np.argmax(score, axis=1).astype(np.int64)


def evaluate(
    model,
    tokenizer,
    eval_df: pl.DataFrame,
    *,
    max_length: int = MAX_LENGTH,
    max_batch_tokens: int = 8192,
    max_batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Held-out metrics of ``model`` on ``eval_df`` (as returned by ``load_eval_set``).

    Returns ``mean_response_loss``, ``token_mean_response_loss``, ``mc_accuracy``,
    ``mc_accuracy_sum_ll``, ``n_items``, ``n_tokens``, ``seconds`` and ``items``: a
    DataFrame with one row per item (id, correct, chosen, answer_index, loss,
    n_response_tokens, choice_losses).
    """
    n = eval_df.height
    if n == 0:
        raise ValueError("evaluate() needs at least one item")
    prompts = [prompt_text(i, x) for i, x in zip(eval_df["instruction"].to_list(), eval_df["input"].to_list())]
    outputs = eval_df["output"].to_list()
    choices = eval_df["choices"].to_list()
    answers = np.asarray(eval_df["answer_index"].to_list(), dtype=np.int64)
    k = max(len(c) for c in choices)
    if any(len(c) != k for c in choices):
        raise ValueError("every item needs the same number of choices")

    all_prompts = list(prompts) + [p for p, cs in zip(prompts, choices) for _ in cs]
    all_responses = list(outputs) + [c for cs in choices for c in cs]
    res = score_samples(
        model,
        tokenizer,
        all_prompts,
        all_responses,
        max_length=max_length,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        with_embeddings=False,
        progress=progress,
    )
    ref_loss = res.loss[:n].astype(np.float64)
    ref_tokens = res.n_response_tokens[:n]
    choice_loss = res.loss[n:].reshape(n, k).astype(np.float64)
    choice_tokens = res.n_response_tokens[n:].reshape(n, k)

    chosen = choose(choice_loss)
    chosen_sum = choose(choice_loss, choice_tokens, normalize=False)
    correct = chosen == answers
    finite = np.isfinite(ref_loss)
    mean_loss, tok_mean = _mean_losses(ref_loss, ref_tokens, finite)
    items = pl.DataFrame(
        {
            "id": eval_df["id"].to_list() if "id" in eval_df.columns else [str(i) for i in range(n)],
            "correct": correct.tolist(),
            "chosen": chosen.tolist(),
            "answer_index": answers.tolist(),
            "loss": ref_loss.astype(np.float32),
            "n_response_tokens": ref_tokens.astype(np.int64),
            "choice_losses": choice_loss.astype(np.float32).tolist(),
        },
        schema=ITEMS_SCHEMA,
    )
    return {
        "mean_response_loss": mean_loss,
        "token_mean_response_loss": tok_mean,
        "mc_accuracy": float(correct.mean()),
        "mc_accuracy_sum_ll": float((chosen_sum == answers).mean()),
        "n_items": int(n),
        "n_loss_missing": int((~finite).sum()),
        "n_tokens": int(res.n_tokens),
        "seconds": float(res.seconds),
        "items": items,
    }


def _mean_losses(loss: np.ndarray, tokens: np.ndarray, finite: np.ndarray) -> tuple[float, float]:
    """(mean over items, mean over response tokens) of the items' finite losses; NaN when none is."""
    if not finite.any():
        return float("nan"), float("nan")
    return float(loss[finite].mean()), float((loss[finite] * tokens[finite]).sum() / tokens[finite].sum())


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a − b over paired items with a 95% bootstrap interval (items resampled);
    ``significant`` when the interval leaves out 0."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return {"mean": None, "ci95": None, "items": 0, "significant": False}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))
    return {"mean": float(d.mean()), "ci95": [lo, hi], "items": int(d.size), "significant": bool(lo > 0 or hi < 0)}


def runs_items_difference(a_runs, b_runs, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a − b where each side is several training runs (rows) over the same items
    (columns), with a 95% interval from a two-level bootstrap: the items are resampled (the same
    items for both sides) and, independently per side, the runs. The interval then holds the
    run-to-run spread (training order, sampling) that every item of a run shares and that an
    item bootstrap leaves out; the runs are not paired across sides, because a change of the
    data reshuffles a seed's training order. Items missing (not finite) in any run are left out."""
    a = np.atleast_2d(np.asarray(a_runs, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b_runs, dtype=np.float64))
    keep = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    a, b = a[:, keep], b[:, keep]
    n_items = a.shape[1]
    if n_items == 0 or a.shape[0] == 0 or b.shape[0] == 0:
        return {"mean": None, "ci95": None, "items": 0, "runs": [a.shape[0], b.shape[0]], "significant": False}
    rng = np.random.default_rng(seed)
    # item resamples as counts, so that a run's mean over them is one matrix product
    counts = np.zeros((n_boot, n_items))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_items), rng.integers(0, n_items, n_boot * n_items)), 1.0)

    def side(x: np.ndarray) -> np.ndarray:
        run_means = x @ counts.T / n_items  # (runs, n_boot)
        pick = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
        return np.take_along_axis(run_means.T, pick, axis=1).mean(axis=1)

    boots = side(a) - side(b)
    lo, hi = float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))
    return {
        "mean": float(a.mean() - b.mean()),
        "ci95": [lo, hi],
        "items": int(n_items),
        "runs": [int(a.shape[0]), int(b.shape[0])],
        "significant": bool(lo > 0 or hi < 0),
    }


def compare_rounds(previous: pl.DataFrame, current: pl.DataFrame) -> dict:
    """This round's held-out items against the previous round's, paired by item ``id``:
    ``mc_accuracy`` (this − previous, > 0 better) and ``response_loss`` (previous − this, > 0
    better), each with its 95% interval; ``worse`` when either is significantly below 0 (the
    round's data trained a worse model than the data before it)."""
    both = previous.select("id", "correct", "loss").join(
        current.select("id", "correct", "loss"), on="id", how="inner", suffix="_now"
    )
    if both.height == 0:
        return {"items": 0, "worse": False, "note": "no held-out item in common with the previous round"}
    mc = paired_difference(both["correct_now"].cast(pl.Float64), both["correct"].cast(pl.Float64))
    loss = paired_difference(both["loss"].cast(pl.Float64), both["loss_now"].cast(pl.Float64))
    worse = any(m["significant"] and m["mean"] < 0 for m in (mc, loss))
    return {"items": both.height, "mc_accuracy": mc, "response_loss": loss, "worse": worse}


def metrics_by_round(
    earlier: Iterable[tuple[int, dict]], current_round: int, current: dict
) -> tuple[list[int], dict[str, list[float]]]:
    """The rounds, in order, and each of ``METRICS`` by round: the ``earlier`` rounds' recorded
    summaries ((round, summary) pairs, ``None`` for a round that has none) and this round's."""
    rounds: list[int] = []
    series: dict[str, list[float]] = {m: [] for m in METRICS}
    for number, summary in [*earlier, (current_round, current)]:
        if summary is None:
            continue
        rounds.append(number)
        for m in METRICS:
            series[m].append(float(summary[m]))
    return rounds, series
