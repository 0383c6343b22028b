"""LLM backends for the optimizer: local transformers generation and OpenAI-compatible HTTP.

Both implement the ``LLMBackend`` protocol of ``llm.py``: ``complete(requests, progress=None)``
returns one ``Completion`` per request, in order; one failed request gives
``Completion(error=...)``; ``BackendUnavailable`` is raised only when the backend as a whole
cannot work (bad key, wrong URL, model missing, server down).

Both also accept ``on_result(index, completion)``: called in the calling thread as soon as a
result is ready (per future for HTTP, per batch for local), so that ``CachedBackend`` can
store every success immediately and a crash mid-batch keeps what was done.

``OpenAIBackend`` never stores the API key on itself: only the SDK client holds it, and every
message this module produces passes through a redaction step first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

from middo_pipeline.core.optimizer.llm import BackendUnavailable, ChatRequest, Completion

log = logging.getLogger(__name__)

# same value as middo_pipeline.models.loading.DEFAULT_MODEL (not imported: that module imports
# torch, and the HTTP backend must not pay for it)
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_REPETITION_PENALTY = 1.1

ProgressFn = Callable[[int, int], None]
ResultFn = Callable[[int, Completion], None]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (the stop string excluded)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


# --------------------------------------------------------------------------------------------
# local transformers backend
# --------------------------------------------------------------------------------------------


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

    Requests are grouped by identical sampling parameters (temperature, seed when sampling,
    max_tokens, stop), sorted by prompt length inside a group and generated ``batch_size`` at a
    time with LEFT padding. The prompt is the chat template (``add_generation_prompt=True``)
    followed by the request's ``prefill``; the completion excludes both. Greedy when
    ``temperature == 0``; otherwise sampling (top_k/top_p off) with the torch RNG seeded by
    ``request.seed`` inside ``fork_rng`` (global RNG untouched). Sampled text is reproducible
    for the same request set and batch size.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        batch_size: int = 8,
        loaded=None,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
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
        return bid

    def __repr__(self) -> str:
        return (
            f"LocalBackend(model={self.model_name!r}, device={self.device!r}, "
            f"batch_size={self.batch_size}, loaded={self._loaded is not None})"
        )

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
                            f"cannot load the local optimizer model {self.model_name!r}: "
                            f"{type(exc).__name__}: {exc}"
                        ) from exc
                    log.info("loaded optimizer model %s in %.1fs", self._loaded.path, time.monotonic() - t0)
        return self._loaded

    def _prompt_text(self, tok, req: ChatRequest) -> str:
        messages = req.as_messages()
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a template: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return text + (req.prefill or "")

    @staticmethod
    def _group_key(req: ChatRequest) -> tuple:
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
            for key, idx in groups.items():
                idx.sort(key=lambda i: -len(prompt_ids[i]))  # longest first: OOM shows early
                for start in range(0, len(idx), self.batch_size):
                    batch = idx[start : start + self.batch_size]
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
        from transformers import StoppingCriteriaList

        tok, model, device = lm.tokenizer, lm.model, lm.device
        first = reqs[0]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self._eos_ids(lm) or [0])[0]
        eos_ids = self._eos_ids(lm)
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), int(pad_id), dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for r, seq in enumerate(ids):  # LEFT padding
            if seq:
                input_ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                attention[r, width - len(seq) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)

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

        with torch.inference_mode():
            if sampling:
                devices = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(int(first.seed))
                    out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
            else:
                out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)

        eos_set = set(eos_ids)
        results = []
        for r, req in enumerate(reqs):
            new = out[r, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos_set), len(new))
            new = new[:cut]
            text = tok.decode(new, skip_special_tokens=True)
            stopped = False
            if req.stop:
                short = truncate_at_stop(text, req.stop)
                stopped, text = short != text, short
            # "length": the text was cut at max_tokens (no end-of-turn, no stop string), as the
            # OpenAI API reports it; verified refinement rejects such outputs
            finish = "length" if cut == len(out[r, width:]) and len(new) >= int(req.max_tokens) and not stopped \
                else "stop"
            results.append(
                Completion(text=text, usage={"prompt_tokens": len(ids[r]), "completion_tokens": len(new),
                                             "finish_reason": finish})
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


# --------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP backend
# --------------------------------------------------------------------------------------------

_PLACEHOLDER_KEY = "EMPTY"


class _Fatal(Exception):
    """A per-request error that means the whole backend cannot work (401/403/404)."""

    def __init__(self, short: str, message: str):
        super().__init__(message)
        self.short = short
        self.message = message


class OpenAIBackend:
    """Chat completions through the official ``openai`` SDK (OpenAI, vLLM, llama.cpp, ...).

    The SDK retries 408/409/429/5xx and connection errors ``max_retries`` times with
    exponential backoff (0.5 s doubling up to 8 s, jittered; a server's ``retry-after`` /
    ``retry-after-ms`` header wins) and applies ``timeout`` per attempt. Requests run on a
    thread pool of ``max_concurrency``. Before the first batch ``check()`` probes the server
    once (GET /models, then a 1-token completion when the model is not listed or /models is not
    served) and raises ``BackendUnavailable`` for a bad key, a wrong URL, a missing model or a
    refused connection.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 4,
        extra_body: dict | None = None,
        max_tokens_field: str = "max_tokens",
        check_timeout: float = 10.0,
    ):
        import openai

        if not base_url:
            raise ValueError("OpenAIBackend needs a base_url, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise ValueError("OpenAIBackend needs a model name")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.base_url = str(base_url).rstrip("/")
        self.model = str(model)
        self.api_key_env = api_key_env
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.extra_body = dict(extra_body) if extra_body else None
        self.max_tokens_field = max_tokens_field
        self.check_timeout = float(check_timeout)

        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.key_is_placeholder = not key
        if not key:
            log.info(
                "OpenAIBackend %s: environment variable %s is not set; sending the placeholder key %r "
                "(fine for local servers such as vLLM)",
                self.base_url, api_key_env, _PLACEHOLDER_KEY,
            )
            key = _PLACEHOLDER_KEY

        self._tls = threading.local()
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._checked = False
        self._counts = {"requests": 0, "attempts": 0, "retries": 0, "errors": 0}
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._on_attempt]})
        self._client = openai.OpenAI(
            api_key=key,
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
            http_client=http_client,
        )

    # -- identity, safety --------------------------------------------------------------------
    @property
    def backend_id(self) -> str:
        return f"openai:{self.base_url}:{self.model}"

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, key={'placeholder' if self.key_is_placeholder else 'set'}, "
            f"max_concurrency={self.max_concurrency}, timeout={self.timeout}, max_retries={self.max_retries})"
        )

    __str__ = __repr__

    def __getstate__(self):
        raise TypeError("OpenAIBackend holds an API key and cannot be pickled; build one per process")

    def _redact(self, text: str) -> str:
        """Mask the key in a message (the SDK client holds the only copy of it)."""
        text = str(text)
        key = getattr(self._client, "api_key", None) if hasattr(self, "_client") else None
        if isinstance(key, str) and len(key) >= 4 and key != _PLACEHOLDER_KEY:
            text = text.replace(key, "***")
        return text

    def _on_attempt(self, request) -> None:  # httpx request hook: one call per HTTP attempt
        self._tls.attempts = getattr(self._tls, "attempts", 0) + 1
        with self._lock:
            self._counts["attempts"] += 1

    def stats(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        self._client.close()

    # -- check -------------------------------------------------------------------------------
    def check(self) -> None:
        """Probe the server once; raise ``BackendUnavailable`` with the likely fix."""
        if self._checked:
            return
        with self._check_lock:
            if not self._checked:
                self._probe()
                self._checked = True

    def _auth_message(self, status: int) -> str:
        how = (
            f"the environment variable {self.api_key_env} is not set, so the placeholder key was sent; set it"
            if self.key_is_placeholder
            else f"check the key in the environment variable {self.api_key_env}"
        )
        return f"{self.base_url} rejected the API key (http {status}): {how}"

    def _connection_message(self) -> str:
        return (
            f"cannot connect to the OpenAI-compatible server at {self.base_url}: is it running, and are "
            f"scheme, host, port and path right (e.g. http://127.0.0.1:8000/v1)?"
        )

    def _probe(self) -> None:
        import openai

        client = self._client.with_options(max_retries=min(1, self.max_retries),
                                           timeout=min(self.timeout, self.check_timeout))
        listed: list[str] | None = None
        try:
            page = client.models.list()
            listed = [str(getattr(m, "id", "")) for m in (getattr(page, "data", None) or [])]
            if self.model in listed:
                return
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise BackendUnavailable(self._auth_message(exc.status_code)) from None
        except openai.APITimeoutError:
            log.warning("OpenAIBackend %s: GET /models timed out; trying a 1-token completion", self.base_url)
        except openai.APIConnectionError:
            raise BackendUnavailable(self._connection_message()) from None
        except Exception as exc:  # 404 (not served), 5xx, odd body: decide with a completion
            log.debug("OpenAIBackend %s: GET /models failed (%s); trying a 1-token completion",
                      self.base_url, type(exc).__name__)
        try:
            client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": "ping"}],
                temperature=0,
                **{self.max_tokens_field: 1},
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise BackendUnavailable(self._auth_message(exc.status_code)) from None
        except openai.NotFoundError:
            if listed is not None:
                shown = ", ".join(listed[:10]) + (" ..." if len(listed) > 10 else "")
                raise BackendUnavailable(
                    f"model {self.model!r} was not found at {self.base_url} (http 404); the server lists: "
                    f"{shown or 'no models'}. Set the optimizer model to one of them."
                ) from None
            raise BackendUnavailable(
                f"{self.base_url}/chat/completions answered http 404: the base_url path is probably wrong "
                f"(OpenAI-compatible servers serve under /v1, e.g. http://127.0.0.1:8000/v1), or model "
                f"{self.model!r} is not served there"
            ) from None
        except openai.APITimeoutError:
            log.warning("OpenAIBackend %s: probe completion timed out; going on", self.base_url)
        except openai.APIConnectionError:
            raise BackendUnavailable(self._connection_message()) from None
        except Exception as exc:
            log.warning("OpenAIBackend %s: probe inconclusive (%s); going on", self.base_url,
                        self._redact(_short_error(exc)))

    # -- requests ----------------------------------------------------------------------------
    def _messages(self, req: ChatRequest) -> list[dict]:
        messages = req.as_messages()
        if req.prefill:
            line = f'Begin your answer with "{req.prefill.strip()}".'
            for m in reversed(messages):
                if m["role"] == "user":
                    m["content"] = f"{m['content']}\n\n{line}"
                    break
            else:
                messages.append({"role": "user", "content": line})
        return messages

    def _one(self, req: ChatRequest) -> Completion:
        self._tls.attempts = 0
        kwargs: dict = {
            "model": self.model,
            "messages": self._messages(req),
            "temperature": req.temperature,
            "seed": req.seed,
            self.max_tokens_field: req.max_tokens,
        }
        if req.stop:
            kwargs["stop"] = list(req.stop[:4])  # the API takes at most 4; all are applied below
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body

        def retries() -> int:
            return max(getattr(self._tls, "attempts", 1) - 1, 0)

        try:
            return self._send(kwargs, req, retries)
        finally:
            with self._lock:
                self._counts["retries"] += retries()

    def _send(self, kwargs: dict, req: ChatRequest, retries) -> Completion:
        import openai

        try:
            resp = self._client.chat.completions.create(**kwargs)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise _Fatal(f"http {exc.status_code}", self._auth_message(exc.status_code)) from None
        except openai.NotFoundError:
            raise _Fatal(
                "http 404",
                f"{self.base_url} answered http 404 for model {self.model!r}: wrong base_url path or model name",
            ) from None
        except openai.RateLimitError:
            return Completion(error=f"rate limited (429) after {retries()} retries")
        except openai.APITimeoutError:
            return Completion(error=f"timeout ({self.timeout:g}s) after {retries()} retries")
        except openai.APIConnectionError:
            return Completion(error=f"connection error after {retries()} retries")
        except openai.APIStatusError as exc:
            code = exc.status_code
            if code >= 500 or code in (408, 409):
                return Completion(error=f"http {code} after {retries()} retries")
            return Completion(error=self._redact(f"http {code}: {_short_error(exc)}")[:300])
        except Exception as exc:  # invalid JSON body and other surprises in the SDK's parsing
            log.debug("OpenAIBackend: malformed response (%s)", type(exc).__name__)
            return Completion(error="malformed response")
        return self._parse(resp, req)

    @staticmethod
    def _parse(resp, req: ChatRequest) -> Completion:
        try:
            choices = getattr(resp, "choices", None)
            if not choices:
                return Completion(error="malformed response")
            message = getattr(choices[0], "message", None)
            content = getattr(message, "content", None)
            if not isinstance(content, str):
                refusal = getattr(message, "refusal", None)
                return Completion(error="refused" if refusal else "malformed response")
            usage = {}
            u = getattr(resp, "usage", None)
            for name in ("prompt_tokens", "completion_tokens"):
                v = getattr(u, name, None)
                if isinstance(v, int):
                    usage[name] = v
            finish = getattr(choices[0], "finish_reason", None)
            if isinstance(finish, str):
                usage["finish_reason"] = finish
        except Exception:
            return Completion(error="malformed response")
        text = content
        if req.prefill:
            p = req.prefill.strip()
            t = text.lstrip()
            if p and t.startswith(p):
                text = t[len(p):]
        if req.stop:
            text = truncate_at_stop(text, req.stop)
        return Completion(text=text, usage=usage)

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
        self.check()
        results: list[Completion | None] = [None] * n
        fatal: _Fatal | None = None
        done = 0
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, n), thread_name_prefix="openai-backend")
        try:
            futures = {pool.submit(self._one, req): i for i, req in enumerate(requests)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    comp = fut.result()
                except _Fatal as exc:
                    if fatal is None:
                        fatal = exc
                        for f in futures:
                            f.cancel()
                    comp = Completion(error=exc.short)
                except CancelledError:
                    comp = Completion(error="cancelled")
                except Exception as exc:  # a bug, not the server: keep the batch going
                    comp = Completion(error=self._redact(f"unexpected {type(exc).__name__}: {exc}")[:300])
                results[i] = comp
                with self._lock:
                    self._counts["requests"] += 1
                    self._counts["errors"] += 0 if comp.ok else 1
                done += 1
                if on_result:
                    on_result(i, comp)
                if progress:
                    progress(done, n)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if fatal is not None:
            raise BackendUnavailable(fatal.message)
        return results  # type: ignore[return-value]


def _short_error(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:200]
    return (getattr(exc, "message", None) or type(exc).__name__)[:200]


# --------------------------------------------------------------------------------------------


def make_backend(kind: str, cache=None, **kwargs):
    """``make_backend("local", model=..., batch_size=...)`` or ``make_backend("openai",
    base_url=..., model=...)``. With ``cache`` (a path or a ``CompletionCache``) the backend is
    wrapped in a ``CachedBackend``."""
    kind = (kind or "").strip().lower()
    if kind == "local":
        backend = LocalBackend(**kwargs)
    elif kind == "openai":
        backend = OpenAIBackend(**kwargs)
    else:
        raise ValueError(f"unknown optimizer backend kind {kind!r}: use 'local' or 'openai'")
    if cache is not None:
        from middo_pipeline.core.optimizer.cache import CachedBackend

        backend = CachedBackend(backend, cache)
    return backend
