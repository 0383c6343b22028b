"""The packed judge path: the 6 judgements of a sample in one batch row after the shared
framing's KV cache, with a 4D attention mask that lets each judgement see exactly its own judge
prompt (``_PackedReader``); checked once per call against whole judge prompts (``_run_packed``).
``expected_scores`` takes it when the model qualifies (``packed_unsupported_reason``)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from middo_pipeline.core.quality.tokens import ScoreTokens, _score_probs
from middo_pipeline.core.torch_utils import _CACHE_NAMES, _accepts, cache_param, model_device

if TYPE_CHECKING:
    from middo_pipeline.core.quality.expected import _Reader, _Results

log = logging.getLogger(__name__)


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Packed:
    """One sample laid out for the shared path: the tokens after the common framing up to the
    end of the full view's shared part (``content``), where the prompt-alone view branches off
    (``branch``, an offset into ``content``), and the 6 judgements' own tails (``COLUMNS``
    order), each continuing its view's branch point (``bases``)."""

    index: int  # the sample's row in the output
    content: list[int]
    branch: int
    suffixes: list[list[int]]
    bases: list[int]


def _plan_sample(index: int, seqs6: list[list[int]], prefix_len: int) -> _Packed | None:
    """Split the 6 judge prompts of one sample into content + branch points + tails; None when
    they do not all start with the framing (e.g. cut from the left)."""
    full = seqs6[3:]
    # P: shared by all 6 (framing + instruction); F: shared by the 3 full-view ones (+ response).
    # Each judgement keeps at least one token of its own, where its score is read.
    p = min(min(_lcp(seqs6[0], x) for x in seqs6[1:]), min(len(x) for x in seqs6) - 1)
    f = min(min(_lcp(full[0], x) for x in full[1:]), min(len(x) for x in full) - 1)
    if p < prefix_len or f < p:
        return None
    content = full[0][prefix_len:f]
    suffixes = [x[p:] for x in seqs6[:3]] + [x[f:] for x in full]
    bases = [p - prefix_len] * 3 + [f - prefix_len] * 3
    return _Packed(index, content, p - prefix_len, suffixes, bases)


def _packed_supported(model) -> bool:
    """The shared path needs a transformers-style causal LM: explicit positions, a custom 4D
    additive attention mask (honoured by the eager and sdpa attention implementations), a past
    KV cache and ``logits_to_keep``."""
    return packed_unsupported_reason(model) is None


def packed_unsupported_reason(model) -> str | None:
    """Why the shared (packed) judge path cannot run on ``model``; None when it can."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        return f"attention implementation {impl!r} takes no custom 4D mask (needs eager or sdpa)"
    missing = [name for name in ("attention_mask", "position_ids", "logits_to_keep") if not _accepts(model, name)]
    if cache_param(model) is None:
        missing.append(" or ".join(_CACHE_NAMES))
    if missing:
        return f"{type(model).__name__}.forward takes no {', '.join(missing)}"
    return None


class _PackedReader:
    """Runs the 6 judgements of several samples in one forward pass per batch.

    Each batch row is one sample, packed as ``[content | tail_1 | … | tail_6]`` after the shared
    framing (its KV cache, ``prefix_cache``, is reused). A 4D attention mask makes every token see
    exactly what it sees in its own judge prompt: content tokens attend causally to the framing
    and the content; a judgement's tail attends to the framing, to the content up to its view's
    branch point (the end of the instruction for the prompt-alone view, so it never sees the
    response; the end of the response for the full view) and causally to itself, never to the
    other tails. Position ids continue from the branch point, so each score is computed from the
    same keys, values and positions as in a separate forward pass over its whole judge prompt.

    Tails are right-aligned in per-judgement slots of equal width across the batch, so the
    score positions are the same columns in every row (``logits_to_keep``)."""

    def __init__(self, model, st: ScoreTokens, pad_id: int, min_mass: float, prefix_cache, prefix_len: int):
        self.model, self.st, self.pad_id, self.min_mass = model, st, pad_id, min_mass
        self.prefix_cache, self.prefix_len = prefix_cache, prefix_len
        self.device = model_device(model)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        self.dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        self.extra = [st.one_id] if st.two_step_ten else []
        self.cache_name = cache_param(model)

    def run(self, items: list[_Packed]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and score-token mass, (B, 6) each."""
        g, extra = self.prefix_len, self.extra
        b = len(items)
        width = max(len(it.content) for it in items)
        slots = [max(len(it.suffixes[j]) + len(extra) for it in items) for j in range(6)]
        q = width + sum(slots)
        input_ids = torch.full((b, q), self.pad_id, dtype=torch.long)
        positions = torch.full((b, q), g, dtype=torch.long)
        # query at column c sees columns [0, seen[c]) (its view's content) and [start[c], c] (its
        # own block: the content itself for content tokens, its tail for tail tokens); padding
        # sees only itself
        seen = torch.zeros((b, q), dtype=torch.long)
        start = torch.arange(q).repeat(b, 1)
        for r, it in enumerate(items):
            n = len(it.content)
            if n:
                input_ids[r, :n] = torch.tensor(it.content, dtype=torch.long)
                positions[r, :n] = torch.arange(g, g + n)
                start[r, :n] = 0
            col = width
            for j in range(6):
                tail = it.suffixes[j] + extra
                c0 = col + slots[j] - len(tail)
                c1 = col + slots[j]
                input_ids[r, c0:c1] = torch.tensor(tail, dtype=torch.long)
                positions[r, c0:c1] = torch.arange(g + it.bases[j], g + it.bases[j] + len(tail))
                seen[r, c0:c1] = it.bases[j]
                start[r, c0:c1] = c0
                col = c1
        keys = torch.arange(q)
        allowed = (keys[None, None, :] < seen[:, :, None]) | (
            (keys[None, None, :] >= start[:, :, None]) & (keys[None, None, :] <= keys[None, :, None])
        )
        if g:
            allowed = torch.cat([torch.ones((b, q, g), dtype=torch.bool), allowed], dim=2)
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        ends = np.cumsum([width] + slots)[1:]
        first_cols = [int(e) - 1 - len(extra) for e in ends]
        second_cols = [int(e) - 1 for e in ends] if extra else []
        keep = first_cols + second_cols
        kwargs = dict(
            input_ids=input_ids.to(self.device),
            attention_mask=mask[:, None].to(self.device),
            position_ids=positions.to(self.device),
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
        )
        if g:
            cache = copy.deepcopy(self.prefix_cache)
            cache.batch_repeat_interleave(b)
            kwargs.update({self.cache_name: cache, "use_cache": True})
        else:
            kwargs.update(use_cache=False)
        logits = self.model(**kwargs).logits  # (b, 6 or 12, V)
        first = torch.log_softmax(logits[:, :6].float(), -1).reshape(b * 6, -1)
        second = torch.log_softmax(logits[:, 6:12].float(), -1).reshape(b * 6, -1) if extra else None
        scores, mass = _score_probs(first, second, self.st, self.min_mass)
        return scores.reshape(b, 6), mass.reshape(b, 6)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.double().cpu(), b.double().cpu()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(nan_a, nan_b) and ((a - b).abs()[~nan_a] <= tol).all())


def _packed_path(
    model,
    reader: _Reader,
    st: ScoreTokens,
    pad_id: int,
    min_mass: float,
    seqs: list[list[int]],
    prefix: list[int],
    max_batch_size: int,
    res: _Results,
    info: dict,
) -> None:
    """Phase 3: one packed forward pass per batch of samples (``_PackedReader``), checked once
    against whole judge prompts; samples it computes leave ``res.pending``. Sets
    ``info["judge_path"]`` to ``packed`` when it ran, else says why in ``fallback_reason``."""
    reason = packed_unsupported_reason(model)
    if reason is not None:
        info["fallback_reason"] = reason
        log.warning("shared judgement passes unavailable (%s); one forward pass per judgement, about 5x slower", reason)
        return
    p = len(prefix)
    plans = []
    for i in range(len(res.pending)):
        six = seqs[6 * i : 6 * i + 6]
        if all(x[:p] == prefix for x in six):
            plan = _plan_sample(i, six, p)
            if plan is not None:
                plans.append(plan)
    if not plans:
        info["fallback_reason"] = "no judge prompt starts with the shared framing"
        return
    packed = _PackedReader(model, st, pad_id, min_mass, reader.prefix_cache, p)
    plans, failure = _run_packed(packed, reader, plans, seqs, res)
    info["fallback_reason"] = failure
    if failure is None:
        info["judge_path"] = "packed"
    # the order is by content length: similar rows share a batch (less padding)
    plans.sort(key=lambda it: (-(len(it.content) + sum(map(len, it.suffixes))), it.index))
    for b0 in range(0, len(plans), max_batch_size):
        batch = plans[b0 : b0 + max_batch_size]
        scores, mass = packed.run(batch)
        for it, s_row, m_row in zip(batch, scores, mass):
            res.put(slice(6 * it.index, 6 * it.index + 6), s_row, m_row)
            res.pending[it.index] = False
        res.report(6 * len(batch))


def _run_packed(
    packed: _PackedReader, reader: _Reader, plans: list[_Packed], seqs, res: _Results
) -> tuple[list[_Packed], str | None]:
    """Check the shared path once against whole judge prompts, on the sample that is cheapest to
    judge (its plain scores are kept). Returns the plans still to run: all but the checked one,
    or none when the check fails (the model does not honour the packed layout: every judgement
    then runs on its own), and why it failed (None when it did not)."""
    probe = min(plans, key=lambda it: (len(it.content) + sum(map(len, it.suffixes)), it.index))
    rows = list(range(6 * probe.index, 6 * probe.index + 6))
    try:
        got, got_mass = packed.run([probe])
    except Exception as exc:  # noqa: BLE001 - any model that rejects the packed inputs
        reason = f"the model rejects the packed inputs ({type(exc).__name__}: {exc})"
        log.warning("shared judgement passes unavailable: %s; one forward pass per judgement", reason)
        return [], reason
    want, want_mass = reader.run([seqs[i] for i in rows], with_prefix=False)
    tol = 1e-3 if packed.dtype in (torch.float32, torch.float64) else 0.15
    if not (_close(got[0], want, tol) and _close(got_mass[0], want_mass, max(tol / 10, 1e-4))):
        diff = float((got[0].double().cpu() - want.double().cpu()).abs().nan_to_num(0).max())
        reason = f"packed passes disagree with whole judge prompts on this model (max |Δscore| {diff:.4g})"
        log.warning("%s; one forward pass per judgement", reason)
        return [], reason
    res.put(rows, want, want_mass)
    res.pending[probe.index] = False
    res.report(6)
    return [it for it in plans if it is not probe], None
