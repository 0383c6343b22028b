"""Step 3 of the loop: decide what happens to each flagged sample, then let the optimizer LLM do it.

Planning (``plan_operations``)
------------------------------
- hard (complexity signal)            -> ``simplified`` (replaces the original)
- low quality (quality signal)        -> ``rewritten``  (replaces the original)
- sparse (diversity signal)           -> ``extended``   (a new sample added beside the original)

**The both-flag rule.** A sample flagged *hard and low-quality* is **rewritten**, not
simplified. The model could not learn it and judges it poor: such a sample is most likely
defective (a wrong answer, a garbled or unanswerable prompt) rather than merely difficult.
Rewriting repairs the defect; simplifying would carry the defective content into an easier
prompt. At most one replacement is made per sample, and the complexity flag is still recorded
in the plan (``is_hard``, and ``flags`` = ``"hard+low_quality"``), so it shows in the metadata.

A sparse sample is extended beside the original, which may also be replaced by its
simplification. A sparse sample that is also *low quality* is not extended (only rewritten):
an extension is built from the sample as it is in D_r, and a defective sample would pass its
defect on (with ``extend_low_quality=True`` it is extended all the same). So one sample can
yield two operations.

Running (``run_operations``)
----------------------------
Two stages, each one batched ``backend.complete`` call over all operations (so a backend can
batch and a cache can resume a crashed round): (1) the prompt step (simplify / rewrite /
extend, see ``prompts.py``), parsed by ``parsing.parse_final_prompt``; (2) the response step,
for the operations whose prompt parsed, answered with ``prompts.response_request``.

With ``candidates = k > 1`` every operation is attempted k times, candidate c with the seed
``config.seed + c`` (sampling: ``config.temperature`` must be > 0), one row per candidate
(``candidate`` column). Rows record whether a step's text was cut at its token limit
(``truncated``), as the backend reports it. Which candidate is kept is decided by
``middo_pipeline.core.verify``, not here.

The new sample is ``instruction = new prompt``, ``input = ""`` and ``output = new response``:
the optimizer sees the instruction together with its input and is asked for a self-contained
prompt, so whatever of the input is needed is folded into the new prompt. Its ``sample_id``
is the usual content hash (``make_sample_id``).

A rewrite whose final prompt is the original's keeps that prompt and is answered anew: the
fault of a sample can be its answer alone (a wrong fact); it fails only when the new answer is
the original's too.

A failed operation (LLM error, no final prompt marker, a result equal to the original, an
empty or refused response ...) yields a row with ``status = "failed"`` and its
``failure_reason``; the merge then keeps the original. Nothing is retried here: a rerun with
the cache resumes, and a different seed / model can be tried by configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import polars as pl

from middo_pipeline.core.encoding import escape_controls
from middo_pipeline.core.llm.protocol import Completion, LLMBackend
from middo_pipeline.core.optimizer.parsing import clean_response, normalize_for_compare, parse_final_prompt
from middo_pipeline.core.optimizer.prompts import PromptConfig, operation_request, response_request
from middo_pipeline.core.schema import EXTENDED, REWRITTEN, SIMPLIFIED, make_sample_id, normalize_text, prompt_text

OPTIMIZER_OPERATIONS = (SIMPLIFIED, REWRITTEN, EXTENDED)
REPLACING_OPERATIONS = (SIMPLIFIED, REWRITTEN)

PLAN_SCHEMA: dict[str, pl.DataType] = {
    "origin_id": pl.String,
    "operation": pl.String,
    "is_hard": pl.Boolean,
    "is_low_quality": pl.Boolean,
    "is_sparse": pl.Boolean,
    "flags": pl.String,  # "hard", "low_quality", "hard+low_quality+sparse", ...
}

REFINED_SCHEMA: dict[str, pl.DataType] = {
    "origin_id": pl.String,
    "operation": pl.String,
    "flags": pl.String,
    "instruction_before": pl.String,
    "input_before": pl.String,
    "output_before": pl.String,
    "instruction_after": pl.String,  # null when failed
    "input_after": pl.String,  # "" when ok (the input is folded into the new prompt), null when failed
    "output_after": pl.String,  # null when failed
    "new_sample_id": pl.String,  # null when failed
    "status": pl.String,  # "ok" | "failed"
    "failure_reason": pl.String,  # null when ok
    "prompt_cached": pl.Boolean,
    "response_cached": pl.Boolean,
    "optimizer_text": pl.String,  # the raw prompt-step completion (shortened), to see why a parse failed
    "candidate": pl.Int64,  # 0..k-1: which of the operation's candidates this row is
    "truncated": pl.Boolean,  # a step's completion was cut at its token limit (null: not known)
}

# how parse reasons read in failure_reason
_PROMPT_REASONS = {
    "empty": "empty prompt",
    "no final prompt marker": "unparseable: no final prompt marker",
    "same as original": "same as original",
    "too short": "prompt too short",
    "too long": "prompt too long",
    "refusal": "refusal (prompt step)",
}
_RESPONSE_REASONS = {
    "empty": "empty response",
    "refusal": "refusal (response step)",
    "too short": "response too short",
}
_RAW_CHARS = 2000


def _flags(hard: bool, low: bool, sparse: bool) -> str:
    return "+".join(name for name, on in (("hard", hard), ("low_quality", low), ("sparse", sparse)) if on)


def plan_operations(
    samples: pl.DataFrame,
    hard_ids: Iterable[str],
    low_quality_ids: Iterable[str],
    sparse_ids: Iterable[str],
    neighbors: Mapping[str, Sequence[str]] | None = None,
    *,
    extend_low_quality: bool = False,
) -> pl.DataFrame:
    """One row per operation to attempt: ``origin_id``, ``operation`` and the flags behind it.

    Hard + low quality -> ``rewritten`` (see the module docstring); sparse -> ``extended`` in
    addition, unless also low quality (and ``extend_low_quality`` is off). Sorted by
    operation, then origin_id. Ids that are not in ``samples`` raise: the
    signals must describe the same dataset. ``neighbors`` does not change the plan (it is used
    by ``run_operations``); it is accepted so both calls take the same signal inputs.
    """
    known = set(samples["sample_id"].to_list())
    hard, low, sparse = set(hard_ids), set(low_quality_ids), set(sparse_ids)
    unknown = (hard | low | sparse) - known
    if unknown:
        raise ValueError(f"{len(unknown)} flagged ids are not in the round's samples, e.g. {sorted(unknown)[:3]}")
    rows = []
    for sid in sorted(hard | low | sparse):
        h, q, s = sid in hard, sid in low, sid in sparse
        base = {"origin_id": sid, "is_hard": h, "is_low_quality": q, "is_sparse": s, "flags": _flags(h, q, s)}
        if q:
            rows.append({**base, "operation": REWRITTEN})
        elif h:
            rows.append({**base, "operation": SIMPLIFIED})
        if s and (extend_low_quality or not q):
            rows.append({**base, "operation": EXTENDED})
    return pl.DataFrame(rows, schema=PLAN_SCHEMA).sort(["operation", "origin_id"])


def _stage_progress(progress: Callable[[int, int], None] | None, offset: int, total_of: Callable[[int], int]):
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress(offset + done, total_of(total))

    return report


def _complete(backend: LLMBackend, requests: list, progress) -> list[Completion]:
    if not requests:
        return []
    out = list(backend.complete(requests, progress=progress))
    if len(out) != len(requests):
        raise RuntimeError(f"optimizer backend returned {len(out)} completions for {len(requests)} requests")
    return out


def run_operations(
    samples: pl.DataFrame,
    plan: pl.DataFrame,
    neighbors: Mapping[str, Sequence[str]] | None,
    backend: LLMBackend,
    config: PromptConfig,
    *,
    round_number: int,
    progress: Callable[[int, int], None] | None = None,
    candidates: int = 1,
) -> pl.DataFrame:
    """Attempt every planned operation; the ``refined_samples`` table (``REFINED_SCHEMA``).

    ``round_number`` (r) is the round the operations belong to (the new samples enter D_{r+1};
    the merge stamps the round on the rows). ``progress(done, total)`` counts LLM calls over both
    stages (the total grows to its final value once the responses are known).
    """
    del round_number  # the merge stamps the round; kept in the signature for symmetry with merge_round
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if candidates > 1 and config.temperature <= 0:
        raise ValueError(
            f"{candidates} candidates per operation need sampling: set a temperature > 0 "
            "(greedy decoding would give the same candidate k times)"
        )
    ops = _operations(samples, plan, neighbors or {}, config, candidates)
    n = len(ops)
    # stage 1: the new prompts (one batched call)
    completions = _complete(backend, [o["request"] for o in ops], _stage_progress(progress, 0, lambda t: 2 * t))
    for o, c in zip(ops, completions):
        _read_prompt(o, c, config.style)
    # stage 2: the responses to the prompts that parsed (one batched call)
    pending = [o for o in ops if o["failure"] is None]
    responses = _complete(
        backend,
        [response_request(o["new_prompt"], o["config"]) for o in pending],
        _stage_progress(progress, n, lambda t: n + t),
    )
    for o, c in zip(pending, responses):
        _read_response(o, c)
    return pl.DataFrame([_refined_row(o) for o in ops], schema=REFINED_SCHEMA)


def _operations(
    samples: pl.DataFrame, plan: pl.DataFrame, neighbors: Mapping[str, Sequence[str]], config: PromptConfig, k: int
) -> list[dict]:
    """One dict per planned operation and candidate (``k`` each), in (operation, origin) order:
    its source sample, the escaped source prompt, the texts a new prompt must not repeat, and
    the stage-1 request (candidate c samples with seed + c)."""
    by_id = {
        r["sample_id"]: r for r in samples.select("sample_id", "instruction", "input", "output").iter_rows(named=True)
    }
    ops = []
    for row in plan.sort(["operation", "origin_id"]).iter_rows(named=True):
        op, oid = row["operation"], row["origin_id"]
        if op not in OPTIMIZER_OPERATIONS:
            raise ValueError(f"plan has unknown operation {op!r}")
        if oid not in by_id:
            raise ValueError(f"plan refers to sample {oid!r}, which is not in the samples")
        src = by_id[oid]
        # sample text is data: control-token strings in it are broken before it reaches the optimizer
        source_prompt = escape_controls(prompt_text(src["instruction"], src["input"]))
        hint_prompts = []
        if op == EXTENDED:
            for nid in neighbors.get(oid) or []:
                if nid != oid and nid in by_id:
                    nb = by_id[nid]
                    hint_prompts.append(escape_controls(prompt_text(nb["instruction"], nb["input"])))
        for c in range(k):
            cfg = dataclasses.replace(config, seed=config.seed + c) if c else config
            ops.append(
                {
                    "origin_id": oid,
                    "operation": op,
                    "flags": row.get("flags"),
                    "source": src,
                    "source_prompt": source_prompt,
                    "originals": [source_prompt, src["instruction"], *hint_prompts],
                    "request": operation_request(op, source_prompt, cfg, hint_prompts[: config.max_hints]),
                    "config": cfg,
                    "candidate": c,
                }
            )
    return ops


def _read_prompt(o: dict, c, style: str) -> None:
    """Stage 1 of one operation: its new prompt from completion ``c``, or why there is none."""
    o["prompt_cached"] = bool(c.cached)
    o["response_cached"] = False
    o["raw"] = None if c.text is None else c.text[:_RAW_CHARS]
    o["new_prompt"] = None
    o["failure"] = None
    o["truncated"] = c.truncated if c.ok else None
    if not c.ok:
        o["failure"] = f"llm error: {c.error or 'no text'}"
        return
    new_prompt, reason = parse_final_prompt(c.text, style, o["originals"])
    if reason == "same as original" and o["operation"] == REWRITTEN:
        # a rewrite may keep a sound prompt when the fault is the answer (a wrong fact): the
        # response step writes a new answer, and an answer left as it was fails below
        new_prompt, reason, o["kept_prompt"] = o["source_prompt"], None, True
    if new_prompt is None:
        o["failure"] = _PROMPT_REASONS.get(reason, f"unparseable: {reason}")
    else:
        o["new_prompt"] = normalize_text(new_prompt)


def _read_response(o: dict, c) -> None:
    """Stage 2 of one operation whose prompt parsed: its response from completion ``c``, or why
    there is none."""
    o["response_cached"] = bool(c.cached)
    o["truncated"] = bool(o["truncated"]) or c.truncated if c.ok else o["truncated"]
    if not c.ok:
        o["failure"] = f"response llm error: {c.error or 'no text'}"
        return
    response, reason = clean_response(c.text)
    if response is None:
        o["failure"] = _RESPONSE_REASONS.get(reason, f"response rejected: {reason}")
        return
    if o.get("kept_prompt") and normalize_for_compare(response) == normalize_for_compare(o["source"]["output"]):
        o["failure"] = _PROMPT_REASONS["same as original"]
        return
    o["response"] = normalize_text(response)


def _refined_row(o: dict) -> dict:
    """One operation's row of the ``refined_samples`` table."""
    src, ok = o["source"], o["failure"] is None
    return {
        "origin_id": o["origin_id"],
        "operation": o["operation"],
        "flags": o["flags"],
        "instruction_before": src["instruction"],
        "input_before": src["input"],
        "output_before": src["output"],
        "instruction_after": o["new_prompt"] if ok else None,
        "input_after": "" if ok else None,
        "output_after": o["response"] if ok else None,
        "new_sample_id": make_sample_id(o["new_prompt"], "", o["response"]) if ok else None,
        "status": "ok" if ok else "failed",
        "failure_reason": None if ok else o["failure"],
        "prompt_cached": o["prompt_cached"],
        "response_cached": o["response_cached"],
        "optimizer_text": o["raw"],
        "candidate": o["candidate"],
        "truncated": o["truncated"],
    }


def empty_refined() -> pl.DataFrame:
    return pl.DataFrame(schema=REFINED_SCHEMA)
