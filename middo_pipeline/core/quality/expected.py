"""Expected scores: one forward pass reads the score distribution at the end of a judge
prompt (see the package docstring). Two readers: ``_Reader`` here (one judge prompt per batch
row, optionally after the shared framing's KV cache) and ``packed._PackedReader`` (the 6
judgements of a sample in one batch row, with a 4D attention mask)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from middo_pipeline.constants import JUDGE_MAX_LENGTH
from middo_pipeline.core.quality.packed import _packed_path
from middo_pipeline.core.quality.prompts import DEFAULT_PREFILL, _build_sequences
from middo_pipeline.core.quality.tokens import ScoreTokens, _score_probs, find_score_tokens
from middo_pipeline.core.torch_utils import _accepts, _returned_cache, cache_param, model_device

log = logging.getLogger(__name__)

DEFAULT_MIN_MASS = 1e-4

Progress = Callable[[int, int], None]


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
