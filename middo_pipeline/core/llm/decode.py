"""Batched decoding for the local backend: the rows of a batch leave it as they finish.

``transformers``' ``generate`` keeps every row of a static batch in every step until the
longest one is done, so a batch whose answers are 20 and 190 tokens long pays for 190 steps
of all its rows. Here a finished row (end of turn, a stop string, its token limit) is removed
from the batch and from the KV cache (``Cache.batch_select_indices``) before the next step, and
the prompt pass computes the logits of the last position only.

The arithmetic is ``generate``'s: the same position ids (from the attention mask, padding on
the left), the same repetition penalty (``RepetitionPenaltyLogitsProcessor``: over the whole
sequence, prompt included), greedy argmax or temperature then multinomial sampling (top-k and
top-p off) from the torch RNG, which the caller seeds. Greedy texts match ``generate``'s up to
float rounding (a smaller batch can round differently; measured identical on the benchmark's
requests, see ``benchmarks/README.md``, generation); sampled texts are reproducible for the
same requests and batch size, but are not ``generate``'s draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from middo_pipeline.core.torch_utils import _accepts, _returned_cache, cache_param

__all__ = ["Decoded", "DecodeUnsupported", "decode_batch"]

StopFn = Callable[[int, list[int]], bool]  # (row, generated tokens so far) -> stop now


class DecodeUnsupported(RuntimeError):
    """The model's forward pass does not return a KV cache whose rows can be dropped (the
    caller falls back to ``generate``)."""


@dataclass
class Decoded:
    tokens: list[int]  # generated tokens, end-of-turn excluded
    finish: str  # "eos" | "stop" | "length"


def _penalize(logits: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    score = torch.gather(logits, 1, seqs)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seqs, score)


@torch.inference_mode()
def decode_batch(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int | Sequence[int],
    eos_ids: Sequence[int],
    repetition_penalty: float = 1.0,
    temperature: float | Sequence[float] = 0.0,
    seeds: Sequence[int] | None = None,
    stop: StopFn | None = None,
) -> list[Decoded]:
    """Decode a LEFT-padded batch; one ``Decoded`` per row, in order. ``max_new_tokens``,
    ``temperature`` and ``seeds`` are per row (or one for all). A sampling row draws from its
    own ``torch.Generator`` seeded with its seed, so its text does not depend on which other
    rows share the batch (beyond float rounding); without ``seeds`` it draws from the global
    torch RNG."""
    n = input_ids.shape[0]
    device = input_ids.device
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    temps = [float(temperature)] * n if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    gens: list = [None] * n
    if seeds is not None:
        for r in range(n):
            if temps[r] > 0:
                gens[r] = torch.Generator(device=device).manual_seed(int(seeds[r]))
    cache_name = cache_param(model)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    eos = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long, device=device)
    out: list[Decoded | None] = [None] * n
    generated: list[list[int]] = [[] for _ in range(n)]

    seqs = input_ids  # whole sequences of the rows still running (for the repetition penalty)
    attn = attention_mask
    pos = attn.long().cumsum(-1) - 1
    pos = pos.masked_fill(attn == 0, 1)
    rows = torch.arange(n, device=device)  # original index of each running row
    res = model(input_ids=seqs, attention_mask=attn, position_ids=pos, use_cache=True, **keep_last)
    cache = _returned_cache(res)
    if cache_name is None or cache is None or not hasattr(cache, "batch_select_indices"):
        raise DecodeUnsupported(f"{type(model).__name__} returns no KV cache that can drop rows")
    logits = res.logits[:, -1, :].float()
    last = pos[:, -1]
    for r in range(n):
        if limits[r] <= 0:
            out[r] = Decoded([], "length")
    running = [j for j in range(n) if out[j] is None]
    if len(running) < n and running:
        keep = torch.tensor(running, dtype=torch.long, device=device)
        cache.batch_select_indices(keep)
        seqs, attn, last, rows, logits = seqs[keep], attn[keep], last[keep], rows[keep], logits[keep]
    while running:
        if repetition_penalty != 1.0:
            logits = _penalize(logits, seqs, repetition_penalty)
        nxt = _next_tokens(logits, rows.tolist(), temps, gens)
        ended = torch.isin(nxt, eos).tolist() if eos.numel() else [False] * len(nxt)
        running = []
        for j, (r, t) in enumerate(zip(rows.tolist(), nxt.tolist())):
            if ended[j]:
                out[r] = Decoded(generated[r], "eos")
                continue
            generated[r].append(t)
            if stop is not None and stop(r, generated[r]):
                out[r] = Decoded(generated[r], "stop")
            elif len(generated[r]) >= limits[r]:
                out[r] = Decoded(generated[r], "length")
            else:
                running.append(j)
        if not running:
            break
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], 1)
        last = last + 1
        step_ids = nxt[:, None]
        if len(running) < len(nxt):
            keep = torch.tensor(running, dtype=torch.long, device=device)
            cache.batch_select_indices(keep)
            seqs, attn, last, rows, step_ids = seqs[keep], attn[keep], last[keep], rows[keep], step_ids[keep]
        res = model(
            input_ids=step_ids,
            attention_mask=attn,
            position_ids=last[:, None],
            use_cache=True,
            **{cache_name: cache},
        )
        cache = _returned_cache(res) or cache
        logits = res.logits[:, -1, :].float()
    return out  # type: ignore[return-value]


def _next_tokens(logits: torch.Tensor, rows: list[int], temps: list[float], gens: list) -> torch.Tensor:
    """Greedy argmax for rows at temperature 0; otherwise temperature then multinomial, from
    the row's own generator when it has one (else the global RNG, all sampling rows at once)."""
    nxt = logits.argmax(-1)
    sampling = [j for j, r in enumerate(rows) if temps[r] > 0]
    if not sampling:
        return nxt
    if all(gens[rows[j]] is None for j in sampling):
        t = torch.tensor([temps[rows[j]] for j in sampling], device=logits.device, dtype=logits.dtype)[:, None]
        idx = torch.tensor(sampling, device=logits.device)
        nxt[idx] = torch.multinomial(torch.softmax(logits[idx] / t, dim=-1), 1).squeeze(1)
        return nxt
    for j in sampling:
        r = rows[j]
        probs = torch.softmax(logits[j] / temps[r], dim=-1)
        nxt[j] = torch.multinomial(probs, 1, generator=gens[r])[0]
    return nxt
