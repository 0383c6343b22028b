"""The LLM client shared by the optimizer operations and the quality judge.

``protocol`` is the contract (``ChatRequest``, ``Completion``, ``LLMBackend``,
``BackendUnavailable``); ``local`` runs a transformers model in this process, ``openai_compat``
talks to any OpenAI-compatible server; ``cache`` keeps every completion on disk
(``CachedBackend``). ``make_backend`` is the one factory.
"""

from __future__ import annotations

from typing import Literal, get_args

from middo_pipeline.core.llm.protocol import BackendUnavailable, ChatRequest, Completion, LLMBackend

__all__ = ["BackendUnavailable", "ChatRequest", "Completion", "LLMBackend", "BackendKind", "BACKENDS", "make_backend"]

BackendKind = Literal["local", "openai"]
BACKENDS: tuple[str, ...] = get_args(BackendKind)


def make_backend(kind: str, cache=None, **kwargs) -> LLMBackend:
    """``make_backend("local", model=..., batch_size=...)`` (or ``loaded=`` an already loaded
    model) or ``make_backend("openai", base_url=..., model=...)``. With ``cache`` (a path or a
    ``CompletionCache``) the backend is wrapped in a ``CachedBackend``."""
    kind = (kind or "").strip().lower()
    if kind == "local":
        from middo_pipeline.core.llm.local import LocalBackend

        backend: LLMBackend = LocalBackend(**kwargs)
    elif kind == "openai":
        from middo_pipeline.core.llm.openai_compat import OpenAIBackend

        backend = OpenAIBackend(**kwargs)
    else:
        raise ValueError(f"unknown LLM backend kind {kind!r}: use one of {', '.join(map(repr, BACKENDS))}")
    if cache is not None:
        from middo_pipeline.core.llm.cache import CachedBackend

        backend = CachedBackend(backend, cache)
    return backend
