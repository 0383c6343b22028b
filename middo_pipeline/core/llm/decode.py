"""Batched decoding for the local backend: the rows of a batch leave it as they finish.

``transformers``' ``generate`` keeps every row of a static batch in every step until the
longest one is done, so a batch whose answers are 20 and 190 tokens long pays for 190 steps
of all its rows. Here a finished row (end of turn, a stop string, its token limit) is removed
from the batch and from the KV cache (``Cache.batch_select_indices``) before the next step, and
the prompt pass computes the logits of the last position only. Four more things a CPU needs
(measured on the generation benchmark's 64 requests, 2 cores, SmolLM2-135M):

- the prompts are read in groups of ``PREFILL_ROWS`` sorted by length, each padded to its own
  longest prompt (the prompt pass of one batch of 64 padded to its longest took 15.7 s; in
  groups of 8, 5.8 s), then laid into one left-padded cache;
- that cache keeps each layer's keys and values in a slab with room for the decoded tokens
  (``_SlabLayer``): a step writes its position in place instead of concatenating the layer's
  whole cache (28% of a step at batch 64);
- the linear weights of the layers are stored column-major while decoding (``column_major``):
  MKL's GEMM with a few rows is faster when the weight's transpose is contiguous;
- the output head (49,152 x 576 for SmolLM2: a fifth of the model's FLOPs) stays row-major
  and is multiplied in blocks of ``HEAD_BLOCK`` output rows (``blocked_head``): one GEMM of a
  few rows by the whole 113 MB head ran at half the speed of the same product in 12 blocks
  (MKL packs each block while it is still in cache), and the column-major head was slower
  still. The logits are bit-identical to one GEMM at these block sizes (measured and tested).

The arithmetic is ``generate``'s: the same position ids (from the attention mask, padding on
the left), the same repetition penalty (``RepetitionPenaltyLogitsProcessor``: over the whole
sequence, prompt included), greedy argmax or temperature then multinomial sampling (top-k and
top-p off) from the torch RNG, which the caller seeds. Greedy texts match ``generate``'s up to
float rounding (a smaller batch can round differently; measured identical on the benchmark's
requests, see benchmarks/reports/2026-12-06-generation.md); sampled texts are reproducible for the
same requests and batch size, but are not ``generate``'s draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from middo_pipeline.core.torch_utils import _accepts, _returned_cache, cache_param

__all__ = ["Decoded", "DecodeUnsupported", "decode_batch"]

# prompts read per forward pass, sorted by length: measured on the benchmark's 64 requests
# (2-core CPU), the prompt pass took 15.7 s as one padded batch of 64, 6.7 s in 4 x 16, 5.8 s in
# 8 x 8 and 9.5 s one by one
PREFILL_ROWS = 8
# positions a KV slab grows by when a row's decoding outruns it (see ``_SlabLayer``)
SLAB_CHUNK = 64
# output-head rows multiplied per GEMM while decoding (see ``blocked_head``): on the 2-core
# machine, 8-64 hidden rows by SmolLM2's 49,152 x 576 head took 19-34 ms in blocks of 1,024 to
# 4,096 against 22-41 ms in one GEMM (row-major) and 30-46 ms column-major
HEAD_BLOCK = 4096

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
    prefill_rows: int = PREFILL_ROWS,
) -> list[Decoded]:
    """Decode a LEFT-padded batch; one ``Decoded`` per row, in order. ``max_new_tokens``,
    ``temperature`` and ``seeds`` are per row (or one for all). A sampling row draws from its
    own ``torch.Generator`` seeded with its seed, so its text does not depend on which other
    rows share the batch (beyond float rounding); without ``seeds`` it draws from the global
    torch RNG. The prompts are read ``prefill_rows`` at a time, sorted by length (see
    ``_prefill``)."""
    n = input_ids.shape[0]
    if n == 0:
        return []
    device = input_ids.device
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    temps = [float(temperature)] * n if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    gens = _row_generators(temps, seeds, device)
    cache_name = cache_param(model)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    eos = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long, device=device)
    out: list[Decoded | None] = [None] * n
    generated: list[list[int]] = [[] for _ in range(n)]

    if cache_name is None:
        raise DecodeUnsupported(f"{type(model).__name__} takes no KV cache argument")
    on_cpu = device.type == "cpu"
    with blocked_head(model, enabled=on_cpu), column_major(model, enabled=on_cpu):
        seqs = input_ids  # whole sequences of the rows still running (for the repetition penalty)
        cache, logits, attn = _prefill(
            model, input_ids, attention_mask, prefill_rows, keep_last, max(limits, default=0)
        )
        last = attn.long().sum(-1) - 1  # each row's last position (padding on the left)
        rows = torch.arange(n, device=device)  # original index of each running row
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
            running = _take_tokens(rows.tolist(), nxt.tolist(), ended, generated, limits, stop, out)
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


def _row_generators(temps: list[float], seeds: Sequence[int] | None, device) -> list:
    """Each sampling row's own ``torch.Generator`` seeded with its seed (None: greedy rows, or
    no ``seeds``: the global torch RNG)."""
    gens: list = [None] * len(temps)
    if seeds is not None:
        for r in range(len(temps)):
            if temps[r] > 0:
                gens[r] = torch.Generator(device=device).manual_seed(int(seeds[r]))
    return gens


def _take_tokens(rows, tokens, ended, generated, limits, stop, out) -> list[int]:
    """One step's tokens into the rows' texts; a row that ended (end-of-turn token, a stop, its
    token limit) gets its ``Decoded`` in ``out``. Returns the batch positions still running."""
    running = []
    for j, (r, t) in enumerate(zip(rows, tokens)):
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
    return running


@contextmanager
def column_major(model, enabled: bool = True):
    """The model's linear weights stored column-major (the same ``[out, in]`` tensors, their
    transposes contiguous) while decoding, then back. On CPU a decoding step multiplies a
    few rows by each weight, and MKL's GEMM is faster when the weight's transpose is
    contiguous: on the 2-core machine 1.1-3x per matrix at 4-32 rows, neutral at 64 and at
    prompt-pass sizes, and 11% of the decoding time on the benchmark's requests. Texts can
    differ from the row-major arithmetic by float rounding (the benchmark reports agreement).
    The output head is left row-major (``blocked_head`` multiplies it faster that way); a
    weight tied to an input embedding is converted with it (a lookup reads it just as well)."""
    params = []
    if enabled:
        head = _output_head(model)
        seen = {id(head.weight)} if head is not None else set()
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, torch.nn.Linear) and w is not None and w.dim() == 2 and id(w) not in seen:
                if w.is_contiguous() and w.dtype.is_floating_point:
                    seen.add(id(w))
                    params.append(w)
    with torch.no_grad():
        for w in params:
            w.data = w.data.t().contiguous().t()
    try:
        yield
    finally:
        with torch.no_grad():
            for w in params:
                w.data = w.data.contiguous()


def _output_head(model):
    """The model's output projection when it is a plain ``nn.Linear``, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, torch.nn.Linear) and head.weight.dim() == 2:
        return head
    return None


@contextmanager
def blocked_head(model, enabled: bool = True, block: int = HEAD_BLOCK):
    """While decoding, the output head multiplies its weight ``block`` output rows at a time
    (``F.linear`` on row slices of the weight, concatenated), in near-equal blocks: on CPU
    faster for a few rows by a large vocabulary (see ``HEAD_BLOCK``). Each logit is the same
    dot product; MKL computes it bit-identically as long as no block is narrow (measured: blocks
    of 256 rows and more, and SmolLM2's 12 x 4,096, equal one GEMM bit for bit; blocks of 7-16
    rows do not), so greedy texts do not change (tested; the generation benchmark checks
    texts). A head that is not a plain ``nn.Linear``, or not larger than one block, is left
    alone; its ``forward`` comes back afterwards, also on error."""
    head = _output_head(model) if enabled else None
    if head is None or head.weight.shape[0] <= block:
        yield
        return
    weight, bias = head.weight, head.bias
    rows = weight.shape[0]
    size = -(-rows // -(-rows // block))  # near-equal blocks: no small tail block
    size = -(-size // 64) * 64
    blocks = [(i, min(i + size, rows)) for i in range(0, rows, size)]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [torch.nn.functional.linear(x, weight[a:b], None if bias is None else bias[a:b]) for a, b in blocks],
            -1,
        )

    had = "forward" in head.__dict__
    saved = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield
    finally:
        if had:
            head.forward = saved
        else:
            del head.forward


def _prefill(model, input_ids, attention_mask, prefill_rows: int, keep_last: dict, max_new: int):
    """The prompt pass: (cache, last-position logits, attention mask), rows in input order.

    Rows are read in groups of ``prefill_rows`` sorted by length, each group padded to its own
    longest row only (one batch padded to the longest prompt of all costs up to twice the
    FLOPs and much more attention-mask work). The groups' keys and values are then laid into
    one left-padded batch cache, in slabs (``_SlabLayer``) with room for the decoded tokens, so
    that a decoding step writes in place instead of concatenating the whole cache. A model
    whose cache is not made of plain ``DynamicLayer`` s (sliding windows, hybrid or linear
    attention layers) gets the plain one-batch prompt pass and its own cache."""
    n, width = input_ids.shape
    lengths = attention_mask.long().sum(-1).tolist()
    order = sorted(range(n), key=lambda r: (lengths[r], r))
    groups = [order[i : i + max(1, prefill_rows)] for i in range(0, n, max(1, prefill_rows))]
    parts = []
    for g in groups:
        w = max(1, max(lengths[r] for r in g))
        res = model(
            input_ids=input_ids[g, width - w :],
            attention_mask=attention_mask[g, width - w :],
            position_ids=_positions(attention_mask[g, width - w :]),
            use_cache=True,
            **keep_last,
        )
        cache = _returned_cache(res)
        if cache is None or not hasattr(cache, "batch_select_indices"):
            raise DecodeUnsupported(f"{type(model).__name__} returns no KV cache that can drop rows")
        if not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
            break  # not a plain dynamic cache: one batch, below
        parts.append((g, w, cache, res.logits[:, -1, :].float()))
    else:
        return _assemble(parts, n, width, attention_mask, max_new)
    res = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_positions(attention_mask),
        use_cache=True,
        **keep_last,
    )
    cache = _returned_cache(res)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        raise DecodeUnsupported(f"{type(model).__name__} returns no KV cache that can drop rows")
    return cache, res.logits[:, -1, :].float(), attention_mask


def _positions(attn: torch.Tensor) -> torch.Tensor:
    """``generate``'s position ids for a left-padded batch."""
    pos = attn.long().cumsum(-1) - 1
    return pos.masked_fill(attn == 0, 1)


def _assemble(parts, n: int, width: int, attention_mask: torch.Tensor, max_new: int):
    """One left-padded batch cache of width ``w`` (the longest prompt) from the groups' caches."""
    _, _, cache0, logit0 = parts[0]
    w = max(p[1] for p in parts)
    logits = logit0.new_empty((n, logit0.shape[-1]))
    attn = attention_mask[:, width - w :]
    layers = []
    for li, layer0 in enumerate(cache0.layers):
        k0, v0 = layer0.keys, layer0.values
        cap = w + min(max(max_new, 1), SLAB_CHUNK)
        kbuf = k0.new_empty((n, k0.shape[1], cap, k0.shape[3]))
        vbuf = v0.new_empty((n, v0.shape[1], cap, v0.shape[3]))
        kbuf[:, :, :w].zero_()  # padding positions are masked, but must not hold NaN
        vbuf[:, :, :w].zero_()
        for g, gw, cache, _ in parts:
            idx = torch.tensor(g, dtype=torch.long, device=k0.device)
            kbuf[idx, :, w - gw : w] = cache.layers[li].keys
            vbuf[idx, :, w - gw : w] = cache.layers[li].values
        layers.append(_SlabLayer(kbuf, vbuf, w))
    for g, _, _, lg in parts:
        logits[torch.tensor(g, dtype=torch.long, device=logits.device)] = lg
    cache0.layers = layers
    return cache0, logits, attn


class _SlabLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are the front of a preallocated slab: a decoding
    step writes its position in place (``DynamicLayer`` concatenates, i.e. copies the layer's
    whole cache, every step: 28% of a decoding step at batch 64 on the benchmark's requests).
    The slab grows by ``SLAB_CHUNK`` positions when full; dropping rows copies it once
    (``index_select``)."""

    def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int):
        super().__init__()
        self.device = kbuf.device
        self.kbuf, self.vbuf, self.n = kbuf, vbuf, int(length)
        self.keys, self.values = kbuf[:, :, : self.n], vbuf[:, :, : self.n]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        step = key_states.shape[-2]
        if self.n + step > self.kbuf.shape[2]:
            self.kbuf, self.vbuf = _grow(self.kbuf, step), _grow(self.vbuf, step)
        self.kbuf[:, :, self.n : self.n + step] = key_states
        self.vbuf[:, :, self.n : self.n + step] = value_states
        self.n += step
        self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # ``index_select`` copies whole rows; ``kbuf[indices]`` (``aten::index``) is a gather
        # 3-6x slower on these slabs (2-core CPU: 0.26 against 1.04 ms for 28 of 29 rows of
        # 3 x 264 x 64), paid by every layer each time a row finishes
        self.kbuf, self.vbuf = self.kbuf.index_select(0, indices), self.vbuf.index_select(0, indices)
        self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a decoding slab is not cropped")


def _grow(buf: torch.Tensor, step: int) -> torch.Tensor:
    extra = buf.new_empty((*buf.shape[:2], max(step, SLAB_CHUNK), buf.shape[3]))
    return torch.cat([buf, extra], 2)


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
