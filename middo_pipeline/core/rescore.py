"""Re-scoring optimizer candidates with the round's own models, the way the round's samples
were scored, so that ``verify`` can compare them with the round's stored thresholds.

For every generated candidate (``status == "ok"``), with the new prompt and response:

- ``loss_before``: response loss under the **base** model ("before training" is always the
  base model: a previous round's checkpoint has already seen the kept samples);
- ``loss_unconditional`` and ``ifd``: the prompt-free response loss under the base model and
  the ratio (``core/ifd.py``);
- ``loss_after`` and the embedding: under the round's checkpoint, in one pass, with the
  round's ``EmbeddingSpec``; the embedding is mapped with the round's ``TopComponents`` and
  ``max_cosine`` is its highest cosine similarity to any of the round's samples and
  ``cosine_original`` its cosine similarity to the sample it was made from (when the round's
  sample ids are given); ``max_cosine_same_task`` its highest cosine similarity to a round
  sample that reads as the same task (``text_rules.same_task``) among its ``SAME_TASK_NEAREST``
  nearest (null when none of them is: a same-task sample farther off is less like it than
  sixteen other tasks are) when the round's texts are given, else ``max_cosine``;
- ``new_task_gain`` (extensions whose origin's texts are in the table: ``instruction_before``,
  ``input_before``, ``output_before``): how much better each prompt explains its own answer
  than the other's, under the base model, the smaller of the two (nats per response token):
  ``min(loss(answer | origin's prompt) - loss(answer | its prompt), loss(origin's answer |
  its prompt) - loss(origin's answer | origin's prompt))``. A new task answers its own
  question and not the origin's: both terms are positive. A paraphrase of the origin has
  interchangeable prompts (about 0 or below); an unrelated or garbled sample has a prompt that
  explains no answer better than the other (about 0 or below). Three more base-model passes
  over the extensions only;
- ``repair_gain`` (simplifications and rewrites whose origin's texts are in the table): how
  much better the candidate's prompt explains the *origin's* answer than both the origin's own
  prompt and no prompt at all, under the base model (nats per response token):
  ``min(loss(origin's answer | origin's prompt), loss(origin's answer)) - loss(origin's answer
  | its prompt)``. A repair of a garbled or truncated prompt keeps the task and poses it
  better: positive (medians 0.73 and 1.32 on the gate benchmark's written repairs); nonsense,
  a re-scrambled prompt or an unchanged one: about 0 or below. The floor at "no prompt" keeps
  out a vague prompt that merely contradicts an unrelated answer less than the clean prompt
  did. 0 without a pass when the prompt is unchanged; one more base-model pass over the
  others (shared with the extensions' passes above);
- ``prompt_fluency_gain`` (the same rows): how much more fluently the candidate's prompt reads
  than the origin's, as the base model's prompt-free loss of the origin's prompt minus that of
  the candidate's (nats per token; 0 when the prompt is unchanged). A scrambled prompt reads
  worse than the clean one it came from (−2.6 to −8 on the gate benchmark) and can still
  "explain" an answer its clean prompt contradicts (an unrelated answer, a reversed string)
  better: ``verify`` asks a repair for both. One prompt-free pass over the moved prompts,
  their origins' prompts and their origins' answers;
- ``judge_score``: the round's checkpoint judges the candidate (expected score), only when the
  round's quality reading uses the judge;
- ``quality_value``: those readings on the round's ``QualityScale``.

Rows that were not generated keep nulls. Order and rows are unchanged. With ``early_reject``
(the gate's cascade), a candidate that its base-model readings already reject (IFD above the
ceiling, or quality below the round's bar when quality reads IFD alone) keeps only those
readings: the later passes, the costlier part, run for the others only (``gate_stage``).

``base`` and ``checkpoint`` are loaded models, or zero-argument callables that open the forward
passes of one (``core.distributed``: ``LocalForward`` here, ``RayForward`` on a cluster); they
are opened one after the other, so a pool that fills the cluster is closed before the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from middo_pipeline.constants import JUDGE_MAX_LENGTH, MAX_LENGTH
from middo_pipeline.core import quality
from middo_pipeline.core.distributed import LocalForward
from middo_pipeline.core.diversity import TopComponents
from middo_pipeline.core.forward import EmbeddingSpec
from middo_pipeline.core.ifd import ifd_scores
from middo_pipeline.core.neighbours import cosine_to_rows, max_cosine_to, top_cosine_to
from middo_pipeline.core.schema import EXTENDED, prompt_text
from middo_pipeline.core.text_rules import same_task
from middo_pipeline.core.verify import CANDIDATE_SIGNAL_COLUMNS, QualityScale, quality_value

__all__ = ["RescoreSettings", "rescore_candidates"]

Progress = Callable[[int, int], None]
SAME_TASK_NEAREST = 16  # round samples read for ``max_cosine_same_task``, nearest first


@dataclass
class RescoreSettings:
    max_length: int = MAX_LENGTH
    max_batch_tokens: int = 8192
    embedding: EmbeddingSpec = EmbeddingSpec()
    judge_max_length: int = JUDGE_MAX_LENGTH
    judge_batch_size: int = 16


def rescore_candidates(
    candidates: pl.DataFrame,
    *,
    base,
    checkpoint,
    scale: QualityScale,
    round_embeddings: np.ndarray,
    components: TopComponents,
    settings: RescoreSettings | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str], Progress | None] | None = None,
    judge_model=None,
    round_ids: Sequence[str] | None = None,
    round_texts: Sequence[tuple[str, str]] | None = None,
    new_task: bool = True,
    repair: bool = True,
    early_reject: Callable[[dict], bool] | None = None,
) -> pl.DataFrame:
    """``candidates`` with the signal columns added (see the module docstring). ``base`` and
    ``checkpoint``: loaded models (``.model``, ``.tokenizer``) or openers of their forward
    passes; ``judge_model``: the loaded checkpoint for the self-judge (default: ``checkpoint``
    when it is a loaded model; needed only when ``scale`` reads the judge).
    ``round_embeddings`` are the round's samples' embeddings *already mapped* by ``components``;
    ``round_ids`` their sample ids, in the same order (for ``cosine_original``);
    ``round_texts`` their (prompt, response), in the same order (for ``max_cosine_same_task``);
    ``new_task``: measure ``new_task_gain``; ``repair``: measure ``repair_gain`` and
    ``prompt_fluency_gain`` (off: the columns stay null, no extra passes).
    ``early_reject``: called once per generated candidate with its row and its base-model
    readings (``loss_before``, ``loss_unconditional``, ``ifd``, and ``quality_value`` when
    ``scale`` reads the IFD alone; the other signal columns null); a candidate it rejects is read
    no further (no cross-prompt passes, no checkpoint pass, no judgement). Column ``gate_stage``:
    ``base`` for those, ``full`` for the candidates read in full, null for the others."""
    st = settings or RescoreSettings()
    if judge_model is None and hasattr(checkpoint, "model"):
        judge_model = checkpoint
    if scale.mode in ("judge", "combined") and judge_model is None:
        raise ValueError(f"quality mode {scale.mode!r} re-scores with the self-judge: pass judge_model")
    n = candidates.height
    cols = {name: np.full(n, np.nan) for name in CANDIDATE_SIGNAL_COLUMNS}
    stage: list[str | None] = [None] * n
    ok = np.flatnonzero(candidates["status"].eq("ok").fill_null(False).to_numpy()) if n else np.zeros(0, dtype=int)
    if len(ok):
        instr = candidates["instruction_after"].to_list()
        inp = candidates["input_after"].to_list() if "input_after" in candidates.columns else [""] * n
        outs = candidates["output_after"].to_list()
        prompts = [prompt_text(instr[i], inp[i]) for i in ok]
        responses = [outs[i] for i in ok]
        kw = dict(max_length=st.max_length, max_batch_tokens=st.max_batch_tokens)
        step = progress or (lambda name: None)
        with _opener(base)() as fwd:
            before = _base_readings(fwd, prompts, responses, ok, cols, scale, kw, step)
            live = _settle_early(candidates, ok, cols, early_reject, stage)
            ok, prompts, responses = ok[live], [prompts[j] for j in live], [responses[j] for j in live]
            loss_before = np.asarray(before.loss, dtype=np.float64)[live]
            gains = _cross_gains(fwd, candidates, ok, prompts, responses, loss_before, kw, step, new_task, repair)
    if len(ok):
        with _opener(checkpoint)() as fwd:
            after = fwd.score_samples(
                prompts,
                responses,
                with_embeddings=True,
                embedding=st.embedding,
                progress=step("candidates: loss + embedding after training"),
                **kw,
            )
        judge = None
        if scale.mode in ("judge", "combined"):
            judge = _self_judge(judge_model, prompts, responses, st, step, log)
        emb = components.transform(after.embedding)
        cols["loss_after"][ok] = after.loss
        for name, (rows, gain) in gains.items():
            cols[name][ok[rows]] = gain
        if judge is not None:
            cols["judge_score"][ok] = judge
        cols["quality_value"][ok] = quality_value(scale, judge, cols["ifd"][ok])
        origin_rows = _row_of(round_ids, candidates["origin_id"].to_list(), ok) if round_ids is not None else None
        _similarities(cols, ok, emb, round_embeddings, prompts, responses, round_texts, origin_rows)
    return candidates.with_columns(
        [
            pl.Series(name, np.where(np.isfinite(v), v, np.nan), dtype=pl.Float64).fill_nan(None)
            for name, v in cols.items()
        ]
        + [pl.Series("gate_stage", stage, dtype=pl.String)]
    )


def _base_readings(fwd, prompts, responses, ok, cols: dict, scale: QualityScale, kw: dict, step):
    """The base model's readings of the candidates at ``ok`` into ``cols``: loss before training,
    prompt-free loss, IFD (and the quality value when it is the IFD's). Returns the loss pass."""
    before = fwd.score_samples(
        prompts, responses, with_embeddings=False, progress=step("candidates: loss before training"), **kw
    )
    uncond = fwd.unconditional_loss(responses, progress=step("candidates: prompt-free loss"), **kw)
    ifd = ifd_scores(before.loss, uncond.loss)
    cols["loss_before"][ok] = before.loss
    cols["loss_unconditional"][ok] = uncond.loss
    cols["ifd"][ok] = ifd
    if scale.mode == "ifd":  # the quality value is the IFD's: known now
        cols["quality_value"][ok] = quality_value(scale, None, ifd)
    return before


def _settle_early(candidates: pl.DataFrame, ok: np.ndarray, cols: dict, early_reject, stage: list) -> np.ndarray:
    """Positions in ``ok`` of the candidates read further: those ``early_reject`` (when given)
    does not reject on their base-model readings. Marks ``stage`` "base" for the others and
    "full" for these."""
    live = np.arange(len(ok))
    if early_reject is not None:
        settled = np.asarray(
            [bool(early_reject(candidates.row(int(i), named=True) | {c: _num(cols[c][i]) for c in cols})) for i in ok],
            dtype=bool,
        )
        live = np.flatnonzero(~settled)
        for i in ok[settled]:
            stage[i] = "base"
    for i in ok[live]:
        stage[i] = "full"
    return live


def _self_judge(judge_model, prompts, responses, st: RescoreSettings, step, log) -> np.ndarray:
    """The self-judge's combined quality score of each candidate (float64)."""
    info: dict = {}
    six = quality.expected_scores(
        judge_model.model,
        judge_model.tokenizer,
        prompts,
        responses,
        max_length=st.judge_max_length,
        max_batch_size=st.judge_batch_size,
        progress=step("candidates: self-judgements"),
        info=info,
    )
    if log and info.get("judge_path") != "packed":
        log(f"candidate judge fell back to one pass per judgement: {info.get('fallback_reason')}")
    return np.asarray(quality.combine_scores(six)["quality_score"], dtype=np.float64)


def _similarities(cols, ok, emb, round_embeddings, prompts, responses, round_texts, origin_rows) -> None:
    """Fills ``max_cosine``, ``max_cosine_same_task`` (the cosine itself without ``round_texts``)
    and, given the origins' rows (``origin_rows``), ``cosine_original`` at ``ok``."""
    cols["max_cosine"][ok] = max_cosine_to(emb, round_embeddings)
    cols["max_cosine_same_task"][ok] = (
        _max_cosine_same_task(emb, round_embeddings, prompts, responses, round_texts)
        if round_texts is not None
        else cols["max_cosine"][ok]
    )
    if origin_rows is not None:
        cols["cosine_original"][ok] = cosine_to_rows(emb, round_embeddings, origin_rows)


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _cross_gains(fwd, candidates, ok, prompts, responses, loss_before, kw, step, new_task, repair) -> dict:
    """{column: (positions in ``ok``, values)} for ``new_task_gain`` of the generated extensions,
    and ``repair_gain`` and ``prompt_fluency_gain`` of the generated simplifications and
    rewrites, whose origin's prompt and answer are in the table (see the module docstring): one
    base-model pass, and one prompt-free pass over the moved prompts."""
    cols = candidates.columns
    if not (new_task or repair) or not {"operation", "instruction_before", "output_before"} <= set(cols):
        return {}
    ops = candidates["operation"].to_list()
    instr = candidates["instruction_before"].to_list()
    inp = candidates["input_before"].to_list() if "input_before" in cols else [""] * candidates.height
    out = candidates["output_before"].to_list()
    known = [j for j, i in enumerate(ok) if (instr[i] or "").strip() and (out[i] or "").strip()]
    ext = [j for j in known if ops[ok[j]] == EXTENDED] if new_task else []
    rep = [j for j in known if ops[ok[j]] != EXTENDED] if repair else []
    p_o = {j: prompt_text(instr[ok[j]], inp[ok[j]] or "") for j in ext + rep}
    a_o = {j: out[ok[j]] for j in ext + rep}
    moved = [j for j in rep if prompts[j] != p_o[j]]  # an unchanged prompt explains nothing better: 0
    # the origin's answer under its own prompt once per origin (its k candidates share it)
    origins = list(dict.fromkeys((p_o[j], a_o[j]) for j in ext + moved))
    at = {pair: i for i, pair in enumerate(origins)}
    # one pass over: each extension's answer under its origin's prompt, the origin's answer
    # under each extension's and each moved repair's prompt, and under its own
    pairs = [(p_o[j], responses[j]) for j in ext] + [(prompts[j], a_o[j]) for j in ext + moved] + origins
    loss = (
        fwd.score_samples(
            [p for p, _ in pairs],
            [a for _, a in pairs],
            with_embeddings=False,
            progress=step("candidates: answers under each other's prompts"),
            **kw,
        ).loss
        if pairs
        else np.zeros(0)
    )
    m, r = len(ext), len(moved)
    origin_own = loss[2 * m + r :]

    def own(js):
        return np.asarray([origin_own[at[(p_o[j], a_o[j])]] for j in js], dtype=np.float64)

    gains = {}
    if new_task:
        rows = np.asarray(ext, dtype=np.int64)
        own_answer = np.asarray(loss_before, dtype=np.float64)[rows]
        gains["new_task_gain"] = (rows, np.minimum(loss[:m] - own_answer, loss[m : 2 * m] - own(ext)))
    if repair:
        # an unchanged prompt explains the answer no better and reads no better: 0, no pass
        gain, fluency = dict.fromkeys(rep, 0.0), dict.fromkeys(rep, 0.0)
        if moved:
            # prompt-free: each moved prompt and its origin's (fluency), the origin's answer (the
            # floor: a prompt that explains the answer no better than no prompt repairs nothing)
            origin_prompts = list(dict.fromkeys(p_o[j] for j in moved))
            origin_answers = list(dict.fromkeys(a_o[j] for j in moved))
            free = fwd.unconditional_loss(
                [prompts[j] for j in moved] + origin_prompts + origin_answers,
                progress=step("candidates: prompt-free passes"),
                **kw,
            ).loss
            q = len(origin_prompts)
            free_prompt = dict(zip(origin_prompts, free[r : r + q]))
            free_answer = dict(zip(origin_answers, free[r + q :]))
            under_new = loss[2 * m : 2 * m + r]
            floor = np.minimum(own(moved), [free_answer[a_o[j]] for j in moved])
            gain.update(zip(moved, floor - under_new))
            fluency.update((j, free_prompt[p_o[j]] - free[i]) for i, j in enumerate(moved))
        rows = np.asarray(rep, dtype=np.int64)
        gains["repair_gain"] = (rows, np.asarray([gain[j] for j in rep], dtype=np.float64))
        gains["prompt_fluency_gain"] = (rows, np.asarray([fluency[j] for j in rep], dtype=np.float64))
    return gains


def _max_cosine_same_task(emb, round_embeddings, prompts, responses, round_texts) -> np.ndarray:
    if len(round_texts) != len(round_embeddings):
        raise ValueError(f"{len(round_texts)} round texts for {len(round_embeddings)} round embeddings")
    sims, rows = top_cosine_to(emb, round_embeddings, SAME_TASK_NEAREST)
    out = np.full(len(prompts), np.nan)
    for i in range(len(prompts)):
        for s, j in zip(sims[i], rows[i]):
            if same_task(prompts[i], responses[i], *round_texts[j]):
                out[i] = s
                break
    return out


def _row_of(round_ids: Sequence[str], origin_ids: list, ok: np.ndarray) -> np.ndarray:
    """The row of each generated candidate's origin in the round's embeddings (-1: not there)."""
    where = {sid: i for i, sid in enumerate(round_ids)}
    return np.asarray([where.get(origin_ids[i], -1) for i in ok], dtype=np.int64)


def _opener(m) -> Callable:
    """A loaded model → an opener of its one-process forward passes; an opener stays one."""
    if hasattr(m, "model") and hasattr(m, "tokenizer"):
        return lambda: LocalForward(m)
    return m
