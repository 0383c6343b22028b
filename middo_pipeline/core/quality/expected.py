"""Expected scores: one forward pass reads the score distribution at the end of a judge
prompt (see the package docstring). Two readers: ``_Reader`` (one judge prompt per batch row,
optionally after the shared framing's KV cache) and ``_PackedReader`` (the 6 judgements of a
sample in one batch row, with a 4D attention mask)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from middo_pipeline.constants import JUDGE_MAX_LENGTH
from middo_pipeline.core.quality.prompts import DEFAULT_PREFILL, _build_sequences
from middo_pipeline.core.quality.tokens import ScoreTokens, find_score_tokens
from middo_pipeline.core.torch_utils import _CACHE_NAMES, _accepts, _returned_cache, cache_param, model_device  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_MIN_MASS = 1e-4

Progress = Callable[[int, int], None]


def _score_probs(first: torch.Tensor, second: torch.Tensor | None, st: ScoreTokens, min_mass: float):
    """(B, V) log-probs at the score position (+ at the position after "1") -> expected scores (B,)."""
    p_first = first.exp()
    digits = p_first[:, list(st.digit_ids)]  # (B, 10)
    if st.ten_id is not None:
        p10 = p_first[:, st.ten_id]
        mass = digits.sum(dim=1) + p10
        probs = torch.cat([digits, p10[:, None]], dim=1)
    else:
        q = second.exp()[:, st.zero_id]  # P("0" | "1")
        mass = digits.sum(dim=1)
        p1 = digits[:, 1]
        probs = torch.cat([digits[:, :1], (p1 * (1 - q))[:, None], digits[:, 2:], (p1 * q)[:, None]], dim=1)
    total = probs.sum(dim=1)
    scores = (probs * torch.arange(11, dtype=probs.dtype, device=probs.device)).sum(dim=1) / total.clamp_min(1e-30)
    scores = torch.where((mass >= min_mass) & (total > 0), scores, torch.full_like(scores, float("nan")))
    return scores, mass


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all sequences (each keeps >= 1 own token)."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(x) for x in seqs) - 1
    for x in seqs[1:]:
        i = 0
        while i < n and x[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return max(n, 0)


class _Reader:
    """Runs batches of judge prompts and reads the score distribution at each one's end."""

    def __init__(self, model, st: ScoreTokens, pad_id: int, min_mass: float):
        self.model, self.st, self.pad_id, self.min_mass = model, st, pad_id, min_mass
        self.device = model_device(model)
        self.use_keep = _accepts(model, "logits_to_keep")
        self.extra = [st.one_id] if st.two_step_ten else []
        self.prefix_cache = None
        self.prefix_len = 0
        self.cache_name = cache_param(model)

    def set_prefix(self, prefix: list[int]) -> None:
        """Run the shared prefix once; its KV cache is reused (copied) by every batch."""
        out = self.model(input_ids=torch.tensor([prefix], dtype=torch.long, device=self.device), use_cache=True)
        cache = _returned_cache(out)
        if self.cache_name is None or cache is None or not hasattr(cache, "batch_repeat_interleave"):
            raise TypeError("the model returned no usable KV cache")
        self.prefix_cache, self.prefix_len = cache, len(prefix)

    def run(self, suffixes: list[list[int]], with_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and score-token mass for one batch: token lists after the shared prefix
        (``with_prefix``), or whole prompts."""
        prefix_len = self.prefix_len if with_prefix else 0
        rows = [x + self.extra for x in suffixes]
        lengths = [len(x) for x in suffixes]  # the score is predicted at position length − 1
        b, width = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((b, prefix_len + width), dtype=torch.long)
        attn[:, :prefix_len] = 1
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            attn[j, prefix_len : prefix_len + len(r)] = 1
        kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": attn.to(self.device)}
        if with_prefix:
            cache = copy.deepcopy(self.prefix_cache)
            cache.batch_repeat_interleave(b)
            kwargs.update({self.cache_name: cache, "use_cache": True})
        first_pos = [L - 1 for L in lengths]
        second_pos = lengths if self.extra else []
        wanted = sorted(set(first_pos) | set(second_pos))
        if self.use_keep:
            logits = self.model(
                **kwargs, logits_to_keep=torch.tensor(wanted, dtype=torch.long, device=self.device)
            ).logits
            col = {p: c for c, p in enumerate(wanted)}
        else:
            logits = self.model(**kwargs).logits
            col = {p: p for p in wanted}
        ar = torch.arange(b, device=logits.device)
        first = torch.log_softmax(
            logits[ar, torch.tensor([col[p] for p in first_pos], device=logits.device)].float(), -1
        )
        second = None
        if self.extra:
            second = torch.log_softmax(
                logits[ar, torch.tensor([col[p] for p in second_pos], device=logits.device)].float(), -1
            )
        return _score_probs(first, second, self.st, self.min_mass)


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


def expected_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int = JUDGE_MAX_LENGTH,
    max_batch_size: int = 16,
    progress: Progress | None = None,
    prefill: str = DEFAULT_PREFILL,
    min_mass: float = DEFAULT_MIN_MASS,
    share_prefix: bool = True,
    return_mass: bool = False,
    info: dict | None = None,
):
    """Expected 0–10 scores, float64 (N, 6) in ``COLUMNS`` order; NaN = missing.

    Every judgement's score is read from its own judge prompt (template, framing, the sample,
    the question, the prefill). Samples too long for ``max_length`` tokens per judge prompt are
    shortened (response and prompt, from their ends; both views show the same shortening).

    With ``share_prefix`` (default) the work common to several judgements is done once:

    - the framing shared by all judge prompts (the chat template's opening, a default system
      prompt, the judge's instructions and rubric) runs once and its KV cache is reused;
    - per sample, ONE pass over the instruction + response serves all 6 judgements: the
      prompt-alone judgements branch off at the end of the instruction (they see nothing
      after it), the full ones at the end of the response, and each adds only its short
      question + prefill. ``max_batch_size`` samples share one forward pass (``_PackedReader``).

    This needs a transformers causal LM with eager or sdpa attention (custom 4D masks). It is
    checked once per call against the plain computation on one sample; models that do not
    qualify or fail the check fall back to one forward pass per judgement (with the shared
    framing cache when the model takes a KV cache), ``max_batch_size`` judge prompts
    at a time, right-padded. ``share_prefix=False`` always runs every judge prompt whole (the
    plain computation). All ways give the same scores up to float rounding.

    ``progress(done, total)`` counts judgements. With ``return_mass=True`` also returns the
    (N, 6) probability mass that fell on the score tokens.

    ``info`` (a dict, filled in place) says which path ran, because the fall-back is an order
    of magnitude slower and callers must be able to say so: ``judge_path`` is ``packed`` (one
    pass per sample), ``per_judgement`` (one pass per judgement) or ``whole`` (share_prefix
    off); ``packed_samples`` / ``per_judgement_samples`` count samples by path, and
    ``fallback_reason`` says why the packed path was not taken (None when it was)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    n = len(prompts)
    if info is None:
        info = {}
    info.update(
        judge_path="whole" if not share_prefix else "per_judgement",
        packed_samples=0,
        per_judgement_samples=n,
        fallback_reason=None if not share_prefix else "no samples",
    )
    res = _Results(n, progress)
    prepared = _prepare(tokenizer, prompts, responses, prefill, max_length, info) if n else None
    if prepared is not None:
        st, seqs = prepared
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        reader = _Reader(model, st, pad_id, min_mass)
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            with torch.inference_mode():
                prefix = _shared_prefix(reader, model, tokenizer, st, max_length) if share_prefix else []
                if share_prefix:
                    _packed_path(model, reader, st, pad_id, min_mass, seqs, prefix, max_batch_size, res, info)
                _per_judgement_path(reader, seqs, prefix, max_batch_size, res)
        finally:
            if was_training:
                model.train()
        n_per = int(res.pending.sum())
        info.update(packed_samples=n - n_per if info["judge_path"] == "packed" else 0, per_judgement_samples=n_per)
    elif n:  # no score tokens: every judgement is missing
        res.report(6 * n)
    out = res.flat.reshape(n, 6)
    mass_out = res.flat_mass.reshape(n, 6)
    n_low = int(np.isnan(out).sum()) if prepared is not None else 0
    if n_low:
        log.info(
            "%d of %d judgements had < %g probability on the score tokens: recorded as missing",
            n_low,
            res.total,
            min_mass,
        )
    return (out, mass_out) if return_mass else out


class _Results:
    """What ``expected_scores`` fills: the (6N,) scores and score-token masses in sample-major
    ``COLUMNS`` order, which samples are still to compute, and the progress count."""

    def __init__(self, n: int, progress: Progress | None):
        self.total = 6 * n
        self.flat = np.full(self.total, np.nan, dtype=np.float64)
        self.flat_mass = np.zeros(self.total, dtype=np.float64)
        self.pending = np.ones(n, dtype=bool)
        self.progress = progress
        self.done = 0

    def report(self, k: int) -> None:
        self.done += k
        if self.progress:
            self.progress(self.done, self.total)

    def put(self, rows, scores: torch.Tensor, mass: torch.Tensor) -> None:
        self.flat[rows] = scores.cpu().double().numpy().reshape(-1)
        self.flat_mass[rows] = mass.cpu().double().numpy().reshape(-1)


def _prepare(
    tokenizer, prompts, responses, prefill: str, max_length: int, info: dict
) -> tuple[ScoreTokens, list[list[int]]] | None:
    """Phase 1: the score tokens and the token ids of the 6N judge prompts; None (all missing)
    when the tokenizer has no score tokens."""
    st = find_score_tokens(tokenizer, prefill)
    if st is None:
        log.warning("the score tokens 0..10 cannot be found in this tokenizer: all quality judgements are missing")
        info.update(fallback_reason="no score tokens in the tokenizer", per_judgement_samples=0)
        return None
    return st, _build_sequences(tokenizer, prompts, responses, st.prefill, max_length)


def _shared_prefix(reader: _Reader, model, tokenizer, st: ScoreTokens, max_length: int) -> list[int]:
    """Phase 2: the framing every judge prompt starts with, run once into ``reader``'s KV cache;
    [] when the model takes no cache, the framing is too short to be worth it, or the cache
    cannot be made."""
    if cache_param(model) is None:
        return []
    # the template's part that no sample changes: common to judge prompts of two made-up
    # samples (every real prompt is then checked token by token)
    ref = _build_sequences(tokenizer, ["a b", "c"], ["d", "e f"], st.prefill, max_length)
    prefix = ref[0][: _common_prefix(ref)]
    if len(prefix) < 8:
        return []
    try:
        reader.set_prefix(prefix)
    except Exception as exc:  # noqa: BLE001 - any model without a usable cache: run whole prompts
        log.warning("shared-prefix cache unavailable (%s: %s); running whole judge prompts", type(exc).__name__, exc)
        return []
    return prefix


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


def _per_judgement_path(
    reader: _Reader, seqs: list[list[int]], prefix: list[int], max_batch_size: int, res: _Results
) -> None:
    """Phase 4: one forward pass per judgement for the samples still pending, ``max_batch_size``
    judge prompts at a time: those that start with the shared prefix after its KV cache, then
    any others whole."""
    p = len(prefix)
    left = [6 * i + j for i in np.flatnonzero(res.pending) for j in range(6)]
    shared = {i: bool(p) and len(seqs[i]) > p and seqs[i][:p] == prefix for i in left}
    for group in (True, False):
        members = [i for i in left if shared[i] == group]
        order = sorted(members, key=lambda i: (-len(seqs[i]), i))
        for b0 in range(0, len(order), max_batch_size):
            batch = order[b0 : b0 + max_batch_size]
            scores, mass = reader.run([seqs[i][p:] if group else seqs[i] for i in batch], with_prefix=group)
            res.put(batch, scores, mass)
            res.report(len(batch))


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
