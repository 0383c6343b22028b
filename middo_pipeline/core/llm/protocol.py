"""The contract between the LLM's users (the optimizer operations, the quality judge) and
the LLM backends.

A backend takes a batch of chat requests and returns one ``Completion`` per request, in order.
It never raises for one failed request: the failure is returned as ``Completion(error=...)``
so that the round can keep the original sample and count the failure. It raises only when
the backend as a whole cannot work (wrong URL, unauthorized, model missing):
``BackendUnavailable``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    # text the assistant turn starts with (prefill); local backends continue it, HTTP backends
    # that cannot prefill send it as the last instruction line; the completion excludes it
    prefill: str = ""

    @staticmethod
    def from_messages(messages: Sequence[dict], **kw) -> ChatRequest:
        return ChatRequest(messages=tuple((m["role"], m["content"]) for m in messages), **kw)

    def as_messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def cache_key(self, backend_id: str) -> str:
        """Backend + model + prompt + sampling parameters -> a stable key."""
        payload = json.dumps({"backend": backend_id, **asdict(self)}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class Completion:
    text: str | None = None
    error: str | None = None  # short reason when the call failed ("timeout", "http 500", ...)
    cached: bool = False
    # prompt_tokens / completion_tokens / finish_reason ("stop" | "length": cut at max_tokens) where known
    usage: dict = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        """The text was cut at the token limit (as far as the backend could tell)."""
        return self.usage.get("finish_reason") == "length"

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


class BackendUnavailable(RuntimeError):
    """The backend cannot be used at all: say why and how to fix it."""


ProgressFn = Callable[[int, int], None]
ResultFn = Callable[[int, Completion], None]


class LLMBackend(Protocol):
    @property
    def backend_id(self) -> str:
        """Identifies backend kind + model (+ base_url) for the cache key; never the API key."""

    def complete(
        self,
        requests: Sequence[ChatRequest],
        progress: ProgressFn | None = None,
        on_result: ResultFn | None = None,
    ) -> list[Completion]:
        """One Completion per request, same order. ``progress(done, total)`` when given.
        ``on_result(index, completion)``, when given, is called in the calling thread as soon
        as a result is ready (per request or per batch), so that ``CachedBackend`` can store
        every success immediately and a crash mid-batch keeps what was done; a result not
        delivered that way is taken from the returned list."""

    def stats(self) -> dict:
        """Counters for the run's metadata (requests, errors, cache hits, ...); may be empty."""


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (the stop string excluded)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]
