"""The batched signal forward pass: per-sample response loss and prompt embedding, together.

One call of the decoder (``model.get_decoder()``) per batch gives the last hidden states
(after the final norm). From them:

- **loss**: the output head (``model.get_output_embeddings()``, the lm_head) is applied *only*
  at the positions that predict a response token (position t-1 predicts token t), in chunks,
  and the token cross-entropies are averaged per sample. The full (batch, length, vocab)
  logits tensor is never built. Known output-head transforms are applied as the model class
  does: Gemma-style ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
  ``logits_scaling``. As a guard for any other head-side trick, the first batch's first
  scorable sample is also scored with the plain full model; if the two disagree, a warning is
  logged and the whole call switches to the full model (``model(...)`` logits; the embedding
  still comes from the decoder's output, caught with a forward hook). ``head="full"`` forces
  that path, ``head="fast"`` skips the check.
- **embedding** (``EmbeddingSpec``): from the last hidden states (after the final norm) or
  from the output of one decoder layer (``layer``: ``"middle"`` or a 1-based index, caught
  with a forward hook on that layer in the same pass), pooled over the ``prompt_span`` tokens
  (the user-message content, no template framing): their mean (``pooling="mean"``) or the
  last prompt token's state (``pooling="last"``, which in a causal model has read the whole
  prompt). When a prompt has no token (empty), all of the sample's tokens are used instead.

Batches are length-bucketed: samples are sorted by token count (longest first, so a batch
that does not fit in memory fails at once), and each batch takes as many samples as fit
under ``max_batch_tokens`` (padded tokens: batch size x longest length) and
``max_batch_size``. Padding is on the right, with an attention mask; results come back in
the caller's order. Tokens after the response's end-of-turn token cannot influence anything
that is computed (causal attention), so they are not fed. Where a model keeps its decoder, head
and layers is read in ``model_parts``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from middo_pipeline.constants import MAX_LENGTH
from middo_pipeline.core.encoding import EncodedSample, encode_samples
from middo_pipeline.core.model_parts import (
    decoder_and_head,
    decoder_layers,
    eval_mode,
    head_transform,
    last_hidden,
    text_config,
    unwrap,
)
from middo_pipeline.core.torch_utils import model_device

log = logging.getLogger(__name__)

__all__ = ["EmbeddingSpec", "ForwardResult", "score_samples", "score_encoded", "mean_response_loss", "make_batches"]

Progress = Callable[[int, int], None]


POOLINGS = ("mean", "last")


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which hidden states make the prompt embedding, and how they are pooled.

    ``layer``: ``"last"`` (after the final norm), ``"middle"`` (the output of decoder layer
    ⌈L/2⌉ of L) or a 1-based layer index. ``pooling``: ``"mean"`` over the prompt tokens or
    the ``"last"`` prompt token."""

    pooling: str = "mean"
    layer: str | int = "last"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"embedding pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if isinstance(self.layer, str) and self.layer not in ("last", "middle"):
            if not self.layer.isdigit():
                raise ValueError(f"embedding layer must be 'last', 'middle' or a layer number, got {self.layer!r}")
            object.__setattr__(self, "layer", int(self.layer))
        if isinstance(self.layer, int) and self.layer < 1:
            raise ValueError(f"embedding layer numbers start at 1, got {self.layer}")

    def layer_index(self, n_layers: int) -> int | None:
        """0-based index of the decoder layer whose output is used; None for the final states."""
        if self.layer == "last":
            return None
        i = (n_layers + 1) // 2 if self.layer == "middle" else int(self.layer)
        if i > n_layers:
            raise ValueError(f"embedding layer {i} does not exist: the model has {n_layers} layers")
        return None if i == n_layers and self.layer != "middle" else i - 1


@dataclass
class ForwardResult:
    loss: np.ndarray  # float32 (N,): mean token cross-entropy over the response tokens; NaN: no response token
    n_response_tokens: np.ndarray  # int64 (N,)
    embedding: np.ndarray | None  # float32 (N, hidden): mean last hidden state over the prompt tokens
    n_tokens: int  # tokens fed to the model (without padding)
    seconds: float
    truncated: np.ndarray | None = None  # bool (N,): the sample was cut to max_length
    head: str = "fast"  # which loss path ran: "fast" (lm_head at response positions) or "full"

    @property
    def samples_per_second(self) -> float:
        return len(self.loss) / max(self.seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)


# ----------------------------------------------------------------------------------------------
# batching


def make_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first; each batch's padded size
    (len(batch) x its longest length) stays within ``max_batch_tokens`` (a sample longer
    than the budget gets a batch of its own)."""
    if max_batch_size < 1 or max_batch_tokens < 1:
        raise ValueError("max_batch_size and max_batch_tokens must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        new_max = max(cur_max, n)
        if cur and (len(cur) + 1 > max_batch_size or (len(cur) + 1) * new_max > max_batch_tokens):
            batches.append(cur)
            cur, new_max = [], n
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


# ----------------------------------------------------------------------------------------------
# one batch


@dataclass
class _Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    lengths: list[int]


def _collate(encs: Sequence[EncodedSample], pad_id: int, device: torch.device) -> _Batch:
    lengths = [_fed_length(e) for e in encs]
    T = max(lengths)
    ids = torch.full((len(encs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encs), T), dtype=torch.long)
    for b, (e, n) in enumerate(zip(encs, lengths)):
        ids[b, :n] = torch.tensor(e.input_ids[:n], dtype=torch.long)
        mask[b, :n] = 1
    return _Batch(ids.to(device), mask.to(device), lengths)


def _fed_length(e: EncodedSample) -> int:
    """Tokens after the response (and after the prompt) cannot change anything computed."""
    return max(min(max(e.response_span[1], e.prompt_span[1]), len(e.input_ids)), 1)


def _targets(encs: Sequence[EncodedSample]) -> tuple[list[int], list[int], list[int]]:
    """(row, predicting position, sample-in-batch) of every scorable response token."""
    rows, pos, tok = [], [], []
    for b, e in enumerate(encs):
        rs, re_ = e.response_span
        for t in range(max(rs, 1), re_):  # token 0 has nothing before it to predict it
            rows.append(b)
            pos.append(t - 1)
            tok.append(e.input_ids[t])
    return rows, pos, tok


def _token_ce_fast(hidden: torch.Tensor, head, transform, rows, pos, tok, chunk: int) -> torch.Tensor:
    device = hidden.device
    r = torch.tensor(rows, dtype=torch.long, device=device)
    p = torch.tensor(pos, dtype=torch.long, device=device)
    y = torch.tensor(tok, dtype=torch.long, device=device)
    h = hidden[r, p]  # (M, H)
    out = torch.empty(len(rows), dtype=torch.float32, device=device)
    for a in range(0, len(rows), chunk):
        logits = transform(head(h[a : a + chunk]).float())
        out[a : a + chunk] = F.cross_entropy(logits, y[a : a + chunk], reduction="none")
    return out


def _token_ce_full(logits: torch.Tensor, rows, pos, tok) -> torch.Tensor:
    device = logits.device
    r = torch.tensor(rows, dtype=torch.long, device=device)
    p = torch.tensor(pos, dtype=torch.long, device=device)
    y = torch.tensor(tok, dtype=torch.long, device=device)
    return F.cross_entropy(logits[r, p].float(), y, reduction="none")


def _prompt_mean(hidden: torch.Tensor, encs: Sequence[EncodedSample], lengths: list[int]) -> torch.Tensor:
    B, T, _ = hidden.shape
    mask = torch.zeros((B, T), dtype=torch.float32, device=hidden.device)
    for b, e in enumerate(encs):
        ps, pe = e.prompt_span
        if pe > ps:
            mask[b, ps:pe] = 1.0
        else:
            mask[b, : lengths[b]] = 1.0
    summed = torch.einsum("bt,bth->bh", mask, hidden.float())
    return summed / mask.sum(dim=1, keepdim=True)


def _prompt_last(hidden: torch.Tensor, encs: Sequence[EncodedSample], lengths: list[int]) -> torch.Tensor:
    pos = [
        min(e.prompt_span[1], lengths[b]) - 1 if e.prompt_span[1] > e.prompt_span[0] else lengths[b] - 1
        for b, e in enumerate(encs)
    ]
    idx = torch.tensor(pos, dtype=torch.long, device=hidden.device)
    return hidden[torch.arange(len(encs), device=hidden.device), idx].float()


def _per_sample_mean(ce: torch.Tensor, sample_idx: list[int], n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    idx = torch.tensor(sample_idx, dtype=torch.long, device=ce.device)
    sums = torch.zeros(n_samples, dtype=torch.float64, device=ce.device).index_add_(0, idx, ce.double())
    counts = torch.bincount(idx, minlength=n_samples) if sample_idx else torch.zeros(n_samples, dtype=torch.long)
    sums, counts = sums.cpu().numpy(), counts.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return mean.astype(np.float32), counts.astype(np.int64)


class _Scorer:
    def __init__(self, model, *, with_embeddings: bool, head: str, embedding: EmbeddingSpec | None = None):
        self.model = unwrap(model)
        self.with_embeddings = with_embeddings
        self.spec = embedding or EmbeddingSpec()
        self.device = model_device(self.model)
        self.decoder, self.lm_head = decoder_and_head(self.model)
        self.transform = head_transform(self.model)
        if head not in ("auto", "fast", "full"):
            raise ValueError(f"head must be 'auto', 'fast' or 'full', got {head!r}")
        self.mode = "full" if head == "full" or self.decoder is None else "fast"
        self.verify = head == "auto" and self.mode == "fast"
        if self.mode == "full" and head != "full":
            log.info("model exposes no decoder/lm_head pair: scoring with the full model")
        vocab = getattr(self.lm_head, "out_features", None) or getattr(text_config(self.model), "vocab_size", 32000)
        self.chunk = max(1, (1 << 25) // max(int(vocab), 1))  # ~128 MB of float32 logits per chunk
        self.layer = None  # the decoder layer whose output is the embedding's source (None: final states)
        if with_embeddings and self.spec.layer != "last":
            layers = decoder_layers(self.decoder) if self.decoder is not None else None
            if layers is None:
                raise ValueError(
                    f"embedding layer {self.spec.layer!r} needs a decoder with a .layers list; "
                    f"{type(self.model).__name__} has none (use layer='last')"
                )
            i = self.spec.layer_index(len(layers))
            self.layer = layers[i] if i is not None else None

    @contextmanager
    def _catch_layer(self, caught: dict):
        if self.layer is None:
            yield
            return
        handle = self.layer.register_forward_hook(lambda m, i, o: caught.__setitem__("layer", last_hidden(o)))
        try:
            yield
        finally:
            handle.remove()

    def _embed(self, hidden: torch.Tensor, encs, lengths) -> np.ndarray:
        pool = _prompt_last if self.spec.pooling == "last" else _prompt_mean
        return pool(hidden, encs, lengths).cpu().numpy()

    def _decoder_hidden(self, batch: _Batch) -> torch.Tensor:
        out = self.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return last_hidden(out)

    def _full(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full model logits (B, T, V) and, when asked, the decoder's last hidden state via a hook."""
        caught: dict = {}
        handle = None
        if self.with_embeddings:
            target = self.decoder if self.decoder is not None else None
            if target is not None:
                handle = target.register_forward_hook(lambda m, i, o: caught.__setitem__("h", last_hidden(o)))
        try:
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                use_cache=False,
                output_hidden_states=self.with_embeddings and handle is None,
            )
        finally:
            if handle is not None:
                handle.remove()
        hidden = caught.get("h")
        if hidden is None and self.with_embeddings:
            hidden = out.hidden_states[-1]
        return out.logits, hidden

    def score(self, encs: Sequence[EncodedSample], pad_id: int):
        batch = _collate(encs, pad_id, self.device)
        rows, pos, tok = _targets(encs)
        caught: dict = {}
        with self._catch_layer(caught):
            if self.mode == "fast":
                hidden = self._decoder_hidden(batch)
                ce = (
                    _token_ce_fast(hidden, self.lm_head, self.transform, rows, pos, tok, self.chunk)
                    if rows
                    else torch.zeros(0, device=hidden.device)
                )
            else:
                logits, hidden = self._full(batch)
                ce = _token_ce_full(logits, rows, pos, tok) if rows else torch.zeros(0, device=logits.device)
                del logits
        loss, counts = _per_sample_mean(ce, rows, len(encs))
        emb = self._embed(caught.get("layer", hidden), encs, batch.lengths) if self.with_embeddings else None
        if self.verify:
            self.verify = False
            self._check(encs, loss, pad_id)
            if self.mode == "full":  # the check failed: redo this batch the safe way
                return self.score(encs, pad_id)
        return loss, counts, emb

    def _check(self, encs, fast_loss: np.ndarray, pad_id: int) -> None:
        cands = [b for b, e in enumerate(encs) if e.response_span[1] > max(e.response_span[0], 1)]
        if not cands:
            self.verify = True  # try again on a later batch
            return
        b = min(cands, key=lambda i: _fed_length(encs[i]))
        one = [encs[b]]
        batch = _collate(one, pad_id, self.device)
        rows, pos, tok = _targets(one)
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        ref = float(_token_ce_full(logits, rows, pos, tok).double().mean())
        got = float(fast_loss[b])
        exact = next(self.model.parameters()).dtype == torch.float32
        tol = (1e-3 if exact else 5e-2) * (1.0 + abs(ref))
        if not (math.isfinite(got) and abs(got - ref) <= tol):
            log.warning(
                "lm_head-at-response-positions loss %.5f differs from the full model's %.5f for %s: "
                "the model post-processes its logits in a way not handled here; using the full model",
                got,
                ref,
                type(self.model).__name__,
            )
            self.mode = "full"


# ----------------------------------------------------------------------------------------------
# public API


def score_encoded(
    model,
    encoded: Sequence[EncodedSample],
    *,
    pad_token_id: int = 0,
    max_batch_tokens: int = 8192,
    max_batch_size: int = 32,
    with_embeddings: bool = True,
    progress: Progress | None = None,
    head: str = "auto",
    embedding: EmbeddingSpec | None = None,
) -> ForwardResult:
    """``score_samples`` on samples already encoded (see ``middo_pipeline.core.encoding``)."""
    t0 = time.perf_counter()
    n = len(encoded)
    loss = np.full(n, np.nan, dtype=np.float32)
    counts = np.zeros(n, dtype=np.int64)
    emb: np.ndarray | None = None
    scorer = _Scorer(model, with_embeddings=with_embeddings, head=head, embedding=embedding)
    lengths = [_fed_length(e) for e in encoded]
    n_tokens = 0
    done = 0
    with eval_mode(scorer.model), torch.inference_mode():
        for idx in make_batches(lengths, max_batch_tokens, max_batch_size):
            b_loss, b_counts, b_emb = scorer.score([encoded[i] for i in idx], pad_token_id)
            loss[idx] = b_loss
            counts[idx] = b_counts
            if with_embeddings:
                if emb is None:
                    emb = np.zeros((n, b_emb.shape[1]), dtype=np.float32)
                emb[idx] = b_emb
            n_tokens += sum(lengths[i] for i in idx)
            done += len(idx)
            if progress is not None:
                progress(done, n)
    if with_embeddings and emb is None:
        hidden = getattr(text_config(scorer.model), "hidden_size", 0) or 0
        emb = np.zeros((0, int(hidden)), dtype=np.float32)
    return ForwardResult(
        loss=loss,
        n_response_tokens=counts,
        embedding=emb,
        n_tokens=int(n_tokens),
        seconds=time.perf_counter() - t0,
        truncated=np.asarray([e.truncated for e in encoded], dtype=bool),
        head=scorer.mode,
    )


def _pad_id(tokenizer, model) -> int:
    for v in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "config", None), "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(v, int):
            return v
    return 0


def score_samples(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str | None],
    *,
    max_length: int = MAX_LENGTH,
    max_batch_tokens: int = 8192,
    max_batch_size: int = 32,
    with_embeddings: bool = True,
    progress: Progress | None = None,
    head: str = "auto",
    embedding: EmbeddingSpec | None = None,
) -> ForwardResult:
    """Per-sample mean response cross-entropy and pooled prompt embedding, batched.

    ``prompts[i]`` is the user turn (see ``schema.prompt_text``), ``responses[i]`` the
    assistant turn (``None``: no response, loss NaN). Samples longer than ``max_length``
    tokens are truncated (response first, see ``encoding``). ``progress(done, total)`` is
    called after each batch. ``head``: "auto" (fast path, checked once against the full
    model), "fast" or "full". ``embedding``: which states and how they are pooled (default:
    the mean of the last hidden states over the prompt tokens).
    """
    encoded = encode_samples(tokenizer, list(prompts), list(responses), max_length)
    return score_encoded(
        model,
        encoded,
        pad_token_id=_pad_id(tokenizer, model),
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        with_embeddings=with_embeddings,
        progress=progress,
        head=head,
        embedding=embedding,
    )


def mean_response_loss(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str | None],
    *,
    max_length: int = MAX_LENGTH,
    max_batch_tokens: int = 8192,
    max_batch_size: int = 32,
    progress: Progress | None = None,
    head: str = "auto",
) -> ForwardResult:
    """``score_samples`` without the embeddings."""
    return score_samples(
        model,
        tokenizer,
        prompts,
        responses,
        max_length=max_length,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        with_embeddings=False,
        progress=progress,
        head=head,
    )
