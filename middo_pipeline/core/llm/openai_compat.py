"""The OpenAI-compatible LLM backend: chat completions over HTTP (OpenAI, vLLM, llama.cpp, ...).

It implements the ``LLMBackend`` protocol (``middo_pipeline.core.llm.protocol``); results
are delivered through ``on_result`` per finished request. ``BackendUnavailable`` is raised
only when the server as a whole cannot be used (bad key, wrong URL, model missing, server down).

``OpenAIBackend`` never stores the API key on itself: only the SDK client holds it, and every
message this module produces passes through a redaction step first.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed

from middo_pipeline.core.llm.protocol import (
    BackendUnavailable,
    ChatRequest,
    Completion,
    ProgressFn,
    ResultFn,
    truncate_at_stop,
)

log = logging.getLogger(__name__)

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
                self.base_url,
                api_key_env,
                _PLACEHOLDER_KEY,
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

        client = self._client.with_options(
            max_retries=min(1, self.max_retries), timeout=min(self.timeout, self.check_timeout)
        )
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
            log.debug(
                "OpenAIBackend %s: GET /models failed (%s); trying a 1-token completion",
                self.base_url,
                type(exc).__name__,
            )
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
            log.warning(
                "OpenAIBackend %s: probe inconclusive (%s); going on", self.base_url, self._redact(_short_error(exc))
            )

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
                text = t[len(p) :]
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
