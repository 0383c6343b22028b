"""The local LLM backend: batched ``generate`` with a transformers causal LM in this process.

It implements the ``LLMBackend`` protocol (``middo_pipeline.core.llm.protocol``); results
are delivered through ``on_result`` per batch, so ``CachedBackend`` stores every success as
soon as it is generated.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from middo_pipeline.constants import DEFAULT_MODEL
from middo_pipeline.core.llm.protocol import (
    BackendUnavailable,
    ChatRequest,
    Completion,
    ProgressFn,
    ResultFn,
    truncate_at_stop,
)

log = logging.getLogger(__name__)

DEFAULT_REPETITION_PENALTY = 1.1
# generation batch: measured by ``python -m benchmarks --only hardware,generation``
# (benchmarks/reports/2026-12-06-generation.md)
# compact engine at batch 64: 4.27x transformers generate at batch 8 on 64 requests, identical
# greedy texts (32: 3.44x). A round sends ~140 requests per step: as 64 + 64 + 14, 87 s; as
# 71 + 71 (batch 128, balanced), 75 s; as one batch of 142, 71 s (same texts). Requests are
# split into equal batches of at most this size; OOM halves a batch and retries
DEFAULT_BATCH_SIZE = 128
QUANTIZE_CHOICES = ("none", "int8")
DEFAULT_QUANTIZE = "none"
# Linear layers left in fp32 by ``quantize=int8`` (by the last part of their name): the MLP's
# output projection, whose input carries activation outliers that a per-token int8 scale cannot
# hold, and the output head. Measured on SmolLM2-135M, held-out response loss (data/eval_large,
# 240 items): fp32 1.669; every Linear int8 (torch's default, per-tensor weights) 3.085;
# per-channel weights 2.837; only down_proj int8 2.542; all but down_proj and the head 1.758
# (benchmarks/reports/2026-12-06-generation.md).
INT8_KEEP_FP32 = ("down_proj", "lm_head", "fc2", "w2")
INT8_SCHEME = "int8-pc-keep-out"  # in the cache key: another scheme writes other text


def quantize_int8(model):
    """``model`` with its Linear layers dynamically quantized to int8 (per-channel weights,
    per-token activations; CPU), except those named in ``INT8_KEEP_FP32``. In place."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig

    spec = {
        name: per_channel_dynamic_qconfig
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in INT8_KEEP_FP32
    }
    with warnings.catch_warnings():  # torch.ao's dynamic quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


# compact: finished rows leave the batch (``core/llm/decode.py``); generate: transformers' generate
ENGINES = ("compact", "generate")
DEFAULT_ENGINE = "compact"


def _folder_fingerprint(folder: Path) -> str | None:
    """A short hash of the names, sizes and modification times of a model folder's weight,
    config and tokenizer files; None when ``folder`` is not a folder (a named model)."""
    try:
        if not folder.is_dir():
            return None
        parts = []
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".gguf", ".model", ".txt"):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12] if parts else None


class LocalBackend:
    """Batched ``generate`` with a local causal LM (loaded lazily, once).

    Requests are sorted by prompt length and generated ``batch_size`` at a time with LEFT
    padding. The prompt is the chat template (``add_generation_prompt=True``) followed by the
    request's ``prefill``; the completion excludes both. Greedy when ``temperature == 0``;
    otherwise sampling (top_k/top_p off).

    Engines: ``compact`` (default, ``core/llm/decode.py``) takes token limit, temperature, seed
    and stop strings per row, so any requests share a batch, and a row leaves the batch when it
    finishes; a sampling row draws from its own generator seeded with ``request.seed``, so its
    text does not depend on the other requests of the batch. ``generate`` (transformers'
    ``generate``) groups requests by identical sampling parameters and samples from the torch
    RNG seeded by the group's seed inside ``fork_rng``; its sampled text is reproducible for
    the same request set and batch size. The global RNG is never touched.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        loaded=None,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        quantize: str = DEFAULT_QUANTIZE,
        engine: str = DEFAULT_ENGINE,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.quantize = quantize
        self.engine = engine
        self.model_name = str(model) if model else DEFAULT_MODEL
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.batch_size = int(batch_size)
        self.repetition_penalty = float(repetition_penalty)
        self._loaded = loaded
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    # -- identity ----------------------------------------------------------------------------
    @property
    def backend_id(self) -> str:
        if self._loaded is not None:
            ident = str(self._loaded.path)
        else:
            path = Path(self.model_name).expanduser()
            # named models (the packaged default, the tiny test model) and hub ids keep their
            # name: resolving the default would convert it just to compute an id
            ident = str(path.resolve()) if path.exists() else self.model_name
        bid = f"local:{ident}"
        fp = _folder_fingerprint(Path(ident))
        if fp:  # a checkpoint rewritten in place (same path) must not hit the old generations
            bid += f"@{fp}"
        if self.repetition_penalty != DEFAULT_REPETITION_PENALTY:
            # changes the text, so it must change the cache key
            bid += f"?repetition_penalty={self.repetition_penalty:g}"
        if self.quantize != "none":  # int8 weights change the text: their own cache entries
            bid += f"?quantize={INT8_SCHEME}"
        return bid

    @property
    def path_name(self) -> str:
        """The benchmark's name for this configuration (``benchmarks/generation.py``)."""
        if self.quantize == "int8":
            return f"int8_batch_{self.batch_size}"
        if self.engine == "compact":
            return f"compact_batch_{self.batch_size}"
        return "transformers_generate" if self.batch_size == 8 else f"batch_{self.batch_size}"

    def __repr__(self) -> str:
        return (
            f"LocalBackend(model={self.model_name!r}, device={self.device!r}, "
            f"batch_size={self.batch_size}, quantize={self.quantize!r}, engine={self.engine!r}, "
            f"loaded={self._loaded is not None})"
        )

    def stats(self) -> dict:
        """No counters: a local backend has no retries or remote errors to count."""
        return {}

    # -- model -------------------------------------------------------------------------------
    @property
    def loaded(self):
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    from middo_pipeline.models.loading import load_model

                    t0 = time.monotonic()
                    try:
                        self._loaded = load_model(
                            self.model_name, device=self.device, dtype=self.dtype, threads=self.threads
                        )
                    except Exception as exc:  # the backend as a whole cannot work
                        raise BackendUnavailable(
                            f"cannot load the local optimizer model {self.model_name!r}: {type(exc).__name__}: {exc}"
                        ) from exc
                    log.info("loaded optimizer model %s in %.1fs", self._loaded.path, time.monotonic() - t0)
                    self._loaded = self._quantized(self._loaded)
        return self._loaded

    def _quantized(self, lm):
        """int8: the Linear layers dynamically quantized (CPU only; elsewhere the model as is)."""
        if self.quantize != "int8":
            return lm

        if lm.device.type != "cpu":
            log.warning("quantize=int8 applies on CPU only: %s runs the model unquantized", lm.device)
            return lm
        lm.model = quantize_int8(lm.model)
        return lm

    def _prompt_text(self, tok, req: ChatRequest) -> str:
        messages = req.as_messages()
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a template: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return text + (req.prefill or "")

    def _group_key(self, req: ChatRequest) -> tuple:
        """Requests that may share a batch. The compact engine takes every setting per row (its
        own token limit, temperature, seed and stop strings), so all requests may; ``generate``
        takes one set per batch."""
        if self.engine == "compact":
            return ()
        sampling = req.temperature > 0
        return (float(req.temperature), req.seed if sampling else 0, int(req.max_tokens), tuple(req.stop))

    def _eos_ids(self, lm) -> list[int]:
        ids: set[int] = set()
        for src in (lm.model.generation_config.eos_token_id, lm.tokenizer.eos_token_id):
            if src is None:
                continue
            ids.update(src if isinstance(src, (list, tuple)) else [src])
        return sorted(int(i) for i in ids)

    # -- generation --------------------------------------------------------------------------
    def complete(
        self,
        requests: Sequence[ChatRequest],
        progress: ProgressFn | None = None,
        on_result: ResultFn | None = None,
    ) -> list[Completion]:
        requests = list(requests)
        n = len(requests)
        if n == 0:
            return []
        lm = self.loaded
        tok = lm.tokenizer
        results: list[Completion | None] = [None] * n

        prompt_ids: list[list[int] | None] = [None] * n
        for i, req in enumerate(requests):
            try:
                prompt_ids[i] = list(tok(self._prompt_text(tok, req), add_special_tokens=False)["input_ids"])
            except Exception as exc:  # a bad request (template error): that request only
                results[i] = Completion(error=f"prompt error: {type(exc).__name__}: {exc}"[:300])

        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            if results[i] is None:
                groups.setdefault(self._group_key(req), []).append(i)

        done = 0
        with self._run_lock:
            if on_result or progress:
                pre = [i for i in range(n) if results[i] is not None]
                for i in pre:
                    done += 1
                    if on_result:
                        on_result(i, results[i])
                if pre and progress:
                    progress(done, n)
            for idx in groups.values():
                idx.sort(key=lambda i: -len(prompt_ids[i]))  # longest first: OOM shows early
                for batch in _balanced(idx, self.batch_size):
                    out = self._generate_safe(lm, [requests[i] for i in batch], [prompt_ids[i] for i in batch])
                    for i, comp in zip(batch, out):
                        results[i] = comp
                        if on_result:
                            on_result(i, comp)
                    done += len(batch)
                    if progress:
                        progress(done, n)
        return results  # type: ignore[return-value]

    def _generate_safe(self, lm, reqs, ids) -> list[Completion]:
        try:
            return self._generate(lm, reqs, ids)
        except Exception as exc:
            msg = str(exc)
            if len(reqs) > 1 and "out of memory" in msg.lower():
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                half = len(reqs) // 2
                log.warning("out of memory at batch %d: retrying as %d + %d", len(reqs), half, len(reqs) - half)
                return self._generate_safe(lm, reqs[:half], ids[:half]) + self._generate_safe(
                    lm, reqs[half:], ids[half:]
                )
            log.warning("local generation failed for a batch of %d: %s: %s", len(reqs), type(exc).__name__, msg[:200])
            err = f"generation error: {type(exc).__name__}: {msg}"[:300]
            return [Completion(error=err) for _ in reqs]

    def _generate(self, lm, reqs: list[ChatRequest], ids: list[list[int]]) -> list[Completion]:
        import torch

        tok, device = lm.tokenizer, lm.device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self._eos_ids(lm) or [0])[0]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), int(pad_id), dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for r, seq in enumerate(ids):  # LEFT padding
            if seq:
                input_ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                attention[r, width - len(seq) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        if self.engine == "compact":
            from middo_pipeline.core.llm.decode import DecodeUnsupported

            try:
                return self._decode_compact(lm, reqs, ids, input_ids, attention, int(pad_id))
            except DecodeUnsupported as exc:
                log.warning("local generation falls back to transformers' generate: %s", exc)
                self.engine = "generate"
        return self._decode_generate(lm, reqs, ids, input_ids, attention, int(pad_id))

    @staticmethod
    @contextlib.contextmanager
    def _seeded(lm, req: ChatRequest):
        """The torch RNG seeded by the request when it samples (the global RNG untouched)."""
        if req.temperature <= 0:
            yield
            return
        import torch

        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            torch.manual_seed(int(req.seed))
            yield

    def _decode_compact(self, lm, reqs, ids, input_ids, attention, pad_id: int) -> list[Completion]:
        from middo_pipeline.core.llm.decode import decode_batch

        tok = lm.tokenizer
        stops = [[s for s in r.stop if s] for r in reqs]
        # a stop string of L characters spans at most L tokens (plus partial byte tokens)
        windows = [4 * max((len(s) for s in st), default=1) + 8 for st in stops]

        def stop_fn(row: int, tokens: list[int]) -> bool:
            if not stops[row]:
                return False
            text = tok.decode(tokens[-windows[row] :], skip_special_tokens=True)
            return any(s in text for s in stops[row])

        decoded = decode_batch(
            lm.model,
            input_ids,
            attention,
            max_new_tokens=[int(r.max_tokens) for r in reqs],
            eos_ids=self._eos_ids(lm),
            repetition_penalty=self.repetition_penalty,
            temperature=[float(r.temperature) for r in reqs],
            seeds=[int(r.seed) for r in reqs],
            stop=stop_fn if any(stops) else None,
        )
        results = []
        for r, (req, d) in enumerate(zip(reqs, decoded)):
            text = tok.decode(d.tokens, skip_special_tokens=True)
            stopped = False
            if req.stop:
                short = truncate_at_stop(text, req.stop)
                stopped, text = short != text, short
            finish = "length" if d.finish == "length" and not stopped else "stop"
            results.append(
                Completion(
                    text=text,
                    usage={"prompt_tokens": len(ids[r]), "completion_tokens": len(d.tokens), "finish_reason": finish},
                )
            )
        return results

    def _decode_generate(self, lm, reqs, ids, input_ids, attention, pad_id: int) -> list[Completion]:
        import torch
        from transformers import StoppingCriteriaList

        tok, model = lm.tokenizer, lm.model
        first = reqs[0]
        eos_ids = self._eos_ids(lm)
        width = input_ids.shape[1]

        kwargs = dict(
            max_new_tokens=int(first.max_tokens),
            repetition_penalty=self.repetition_penalty,
            pad_token_id=int(pad_id),
            eos_token_id=eos_ids or None,
        )
        sampling = first.temperature > 0
        if sampling:
            kwargs.update(do_sample=True, temperature=float(first.temperature), top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if first.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(tok, width, first.stop)])

        with torch.inference_mode(), self._seeded(lm, first):
            out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)

        eos_set = set(eos_ids)
        results = []
        for r, req in enumerate(reqs):
            new = out[r, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos_set), len(new))
            n_generated = len(new)
            new = new[:cut]
            text = tok.decode(new, skip_special_tokens=True)
            stopped = False
            if req.stop:
                short = truncate_at_stop(text, req.stop)
                stopped, text = short != text, short
            # "length": the text was cut at max_tokens (no end-of-turn, no stop string), as the
            # OpenAI API reports it; verified refinement rejects such outputs
            finish = "length" if cut == n_generated and len(new) >= int(req.max_tokens) and not stopped else "stop"
            results.append(
                Completion(
                    text=text,
                    usage={"prompt_tokens": len(ids[r]), "completion_tokens": len(new), "finish_reason": finish},
                )
            )
        return results


class _StopStrings:
    """Per-row stopping: a row is finished once its generated text contains a stop string."""

    def __init__(self, tokenizer, prompt_width: int, stops: Sequence[str]):
        self.tok = tokenizer
        self.start = prompt_width
        self.stops = [s for s in stops if s]
        # a stop string of L characters spans at most L tokens (plus partial byte tokens)
        self.window = 4 * max((len(s) for s in self.stops), default=1) + 8
        self.finished: set[int] = set()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for r in range(input_ids.shape[0]):
            if r in self.finished:
                done[r] = True
                continue
            tail = input_ids[r, max(self.start, input_ids.shape[1] - self.window) :].tolist()
            text = self.tok.decode(tail, skip_special_tokens=True)
            if any(s in text for s in self.stops):
                self.finished.add(r)
                done[r] = True
        return done


def _balanced(idx: list[int], batch_size: int) -> list[list[int]]:
    """``idx`` in order, cut into the fewest batches of at most ``batch_size``, of equal sizes
    (within one): 142 requests at 128 are 71 + 71, not 128 + 14, whose small tail batch decodes
    for as many steps as a full one."""
    if not idx:
        return []
    k = -(-len(idx) // max(1, batch_size))
    size, extra = divmod(len(idx), k)
    out, start = [], 0
    for b in range(k):
        end = start + size + (b < extra)
        out.append(idx[start:end])
        start = end
    return out
