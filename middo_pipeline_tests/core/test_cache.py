"""CompletionCache (SQLite, WAL) and CachedBackend: hits, resume after a crash, persistence
across instances and processes, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import uuid

import pytest

from middo_pipeline.core.llm.cache import CachedBackend, CompletionCache
from middo_pipeline.core.llm.local import LocalBackend
from middo_pipeline.core.llm.openai_compat import OpenAIBackend
from middo_pipeline.core.llm.protocol import BackendUnavailable, ChatRequest, Completion
from middo_pipeline_tests.core.fake_openai_server import chat_ok, error, last_user

KEY_ENV = "MIDDO_TEST_OPENAI_KEY"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def req(text: str, **kw) -> ChatRequest:
    return ChatRequest.from_messages([{"role": "user", "content": text}], **kw)


class CountingBackend:
    """In-memory backend: ``fail`` texts give errors; ``die_after`` raises mid-batch."""

    backend_id = "fake:counting"

    def __init__(self, fail=(), die_after=None, stream=True):
        self.sent: list[str] = []
        self.fail = set(fail)
        self.die_after = die_after
        if not stream:
            self.complete = self._complete_plain  # delivers nothing through on_result: the wrapper stores at the end

    def _answer(self, r: ChatRequest) -> Completion:
        text = r.messages[-1][1]
        self.sent.append(text)
        if text in self.fail:
            return Completion(error="http 500 after 0 retries")
        return Completion(text=f"answer to {text}", usage={"completion_tokens": 3})

    def complete(self, requests, progress=None, on_result=None):
        out = []
        for i, r in enumerate(requests):
            if self.die_after is not None and i >= self.die_after:
                raise BackendUnavailable("server went away")
            c = self._answer(r)
            out.append(c)
            if on_result:
                on_result(i, c)
            if progress:
                progress(i + 1, len(requests))
        return out

    def _complete_plain(self, requests, progress=None, on_result=None):
        return [self._answer(r) for r in requests]


# ---------------------------------------------------------------------------------------------
# CompletionCache
# ---------------------------------------------------------------------------------------------


def test_cache_roundtrip_wal_and_errors_not_stored(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    cache = CompletionCache(path)
    r = req("hello", max_tokens=5)
    key = r.cache_key("b")
    assert cache.get(key) is None
    assert cache.put(key, "b", r, Completion(text="hi there", usage={"completion_tokens": 2}))
    assert not cache.put("k2", "b", r, Completion(error="timeout"))
    got = cache.get(key)
    assert got == Completion(text="hi there", cached=True, usage={"completion_tokens": 2})
    assert len(cache) == 1 and key in cache and "k2" not in cache
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        row = con.execute("SELECT key, backend_id, request, text, usage, created_at FROM completions").fetchone()
    assert row[0] == key and row[1] == "b" and '"hello"' in row[2] and row[3] == "hi there"
    assert row[4] == '{"completion_tokens": 2}' and row[5].startswith("20")
    # an empty completion is a success too and must round-trip as ""
    cache.put("empty", "b", None, Completion(text=""))
    assert cache.get("empty").text == ""
    assert cache.count("b") == 2 and cache.delete("b") == 2 and len(cache) == 0
    cache.close()


def test_cache_survives_a_new_instance(tmp_path):
    path = tmp_path / "c.sqlite"
    first = CachedBackend(CountingBackend(), CompletionCache(path))
    reqs = [req(f"q{i}") for i in range(5)]
    out1 = first.complete(reqs)
    first.cache.close()
    inner = CountingBackend()
    second = CachedBackend(inner, CompletionCache(path))  # a new process would do the same
    out2 = second.complete(reqs)
    assert inner.sent == []
    assert all(c.cached for c in out2)
    assert [c.text for c in out2] == [c.text for c in out1]
    assert second.stats()["hits"] == 5


def test_cached_backend_hits_misses_dedup_and_order(tmp_path):
    inner = CountingBackend(fail={"bad"})
    cb = CachedBackend(inner, tmp_path / "c.sqlite")
    assert cb.backend_id == inner.backend_id
    progress = []
    out = cb.complete([req("a"), req("b"), req("a"), req("bad")], progress=lambda d, t: progress.append((d, t)))
    assert [c.text for c in out] == ["answer to a", "answer to b", "answer to a", None]
    assert out[3].error and not any(c.cached for c in out)
    assert inner.sent == ["a", "b", "bad"]  # the duplicate went once
    assert progress[-1] == (4, 4)
    # 3 completion tokens per answer (CountingBackend), counted once per call that generated
    assert cb.stats() == {"hits": 0, "misses": 4, "errors": 1, "stored": 2, "hit_rate": 0.0, "generated_tokens": 6}

    inner.sent.clear()
    inner.fail.clear()
    out = cb.complete([req("b"), req("bad"), req("a"), req("c")])
    assert inner.sent == ["bad", "c"]  # the failed one is retried, the hits are not sent
    assert [c.cached for c in out] == [True, False, True, False]
    assert [c.text for c in out] == ["answer to b", "answer to bad", "answer to a", "answer to c"]
    s = cb.stats()
    assert (s["hits"], s["misses"], s["errors"], s["stored"]) == (2, 6, 1, 4)
    assert s["generated_tokens"] == 12  # the cache hits generated nothing
    assert cb.hits == 2 and cb.misses == 6
    # a different sampling parameter is a different key
    inner.sent.clear()
    cb.complete([req("a", temperature=0.7)])
    assert inner.sent == ["a"]


def test_cached_backend_reports_progress_per_batch_not_per_result(tmp_path):
    """A batch's results arrive together; a progress line at its first result ("1/6") would
    give an ETA of the whole run at one request per batch time."""

    class Batches(CountingBackend):
        def complete(self, requests, progress=None, on_result=None):
            out = [self._answer(r) for r in requests]
            for start in range(0, len(out), 3):
                for i in range(start, min(start + 3, len(out))):
                    on_result(i, out[i])
                if progress:
                    progress(min(start + 3, len(out)), len(out))
            return out

    cb = CachedBackend(Batches(), tmp_path / "c.sqlite")
    cb.complete([req("h")])
    seen = []
    out = cb.complete([req(t) for t in "abhcde"], progress=lambda d, t: seen.append((d, t)))
    assert [c.text for c in out] == [f"answer to {t}" for t in "abhcde"]
    assert seen == [(1, 6), (4, 6), (6, 6)]  # the hit first, then after each batch of 3 misses


def test_cached_backend_when_the_inner_backend_delivers_only_at_the_end(tmp_path):
    inner = CountingBackend(stream=False)
    cb = CachedBackend(inner, tmp_path / "c.sqlite")
    progress = []
    assert [c.text for c in cb.complete([req("x"), req("y")], progress=lambda d, t: progress.append(d))] == [
        "answer to x",
        "answer to y",
    ]
    assert cb.cache.count() == 2 and progress[-1] == 2


def test_crash_mid_batch_keeps_what_was_done(tmp_path):
    path = tmp_path / "c.sqlite"
    reqs = [req(f"q{i}") for i in range(6)]
    dying = CountingBackend(die_after=4)
    with pytest.raises(BackendUnavailable):
        CachedBackend(dying, path).complete(reqs)
    assert CompletionCache(path).count() == 4  # stored as they arrived
    inner = CountingBackend()
    out = CachedBackend(inner, path).complete(reqs)
    assert inner.sent == ["q4", "q5"]
    assert [c.cached for c in out] == [True] * 4 + [False] * 2


def _write_rows(path: str, worker: int, n: int) -> None:
    cache = CompletionCache(path)
    for i in range(n):
        cache.put(f"w{worker}-{i}", "proc", {"i": i}, Completion(text=f"{worker}:{i}"))
    cache.close()


def test_concurrent_writers_threads_and_processes(tmp_path):
    path = tmp_path / "c.sqlite"
    shared = CompletionCache(path)
    errors = []

    def thread_writer(t: int):
        try:
            own = CompletionCache(path) if t % 2 else shared  # shared instance and own instances
            for i in range(40):
                own.put(f"t{t}-{i}", "thread", None, Completion(text=f"{t}:{i}"))
                if i % 10 == 0:
                    own.put_many([(f"t{t}-{i}-{j}", "thread", None, Completion(text="m")) for j in range(5)])
                assert own.get(f"t{t}-{i}").text == f"{t}:{i}"
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_rows, args=(str(path), w, 40)) for w in range(2)]
    for p in procs:
        p.start()
    threads = [threading.Thread(target=thread_writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert not errors, errors
    assert shared.count("thread") == 8 * (40 + 4 * 5)
    assert shared.count("proc") == 2 * 40
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---------------------------------------------------------------------------------------------
# with the real backends
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def openai_backend(fake, monkeypatch):
    monkeypatch.setenv(KEY_ENV, f"sk-{uuid.uuid4().hex}")
    return OpenAIBackend(fake.url, "test-model", api_key_env=KEY_ENV, max_retries=0, timeout=5.0, max_concurrency=4)


def test_second_call_is_served_from_cache(fake, openai_backend, tmp_path):
    cb = CachedBackend(openai_backend, tmp_path / "c.sqlite")
    reqs = [req(f"q{i}") for i in range(8)]
    first = cb.complete(reqs)
    assert all(c.ok and not c.cached for c in first)
    n_chat = len(fake.chat_calls)
    assert n_chat == 8
    again = cb.complete(reqs)
    assert all(c.cached for c in again) and [c.text for c in again] == [c.text for c in first]
    assert len(fake.chat_calls) == n_chat  # the server saw nothing new
    assert again[0].usage == {"prompt_tokens": 7, "completion_tokens": 3, "finish_reason": "stop"}


def test_half_failed_run_then_rerun_sends_only_the_missing(fake, openai_backend, tmp_path):
    path = tmp_path / "c.sqlite"
    fake.chat = lambda body, n: error(500, "down") if int(last_user(body)[1:]) % 2 else chat_ok(last_user(body))
    reqs = [req(f"q{i}") for i in range(10)]
    out = CachedBackend(openai_backend, path).complete(reqs)
    assert [c.ok for c in out] == [i % 2 == 0 for i in range(10)]
    assert CompletionCache(path).count() == 5

    fake.calls.clear()
    fake.chat = lambda body, n: chat_ok(last_user(body))
    cb = CachedBackend(openai_backend, CompletionCache(path))
    out = cb.complete(reqs)
    assert sorted(last_user(c.body) for c in fake.chat_calls) == sorted(f"q{i}" for i in range(1, 10, 2))
    assert all(c.ok for c in out) and [c.text for c in out] == [f"q{i}" for i in range(10)]
    assert [c.cached for c in out] == [i % 2 == 0 for i in range(10)]
    assert cb.stats()["hits"] == 5 and cb.stats()["misses"] == 5


def test_local_backend_is_cached_per_batch(tiny_model_dir, tmp_path):
    local = LocalBackend(str(tiny_model_dir), device="cpu", batch_size=2)
    path = tmp_path / "c.sqlite"
    cb = CachedBackend(local, path)
    seen = []
    reqs = [req(f"prompt number {i}", max_tokens=4) for i in range(5)]
    out = cb.complete(reqs, on_result=lambda i, c: seen.append((i, CompletionCache(path).count())))
    assert all(c.ok for c in out)
    # results arrive per batch and are already in the cache when they are reported
    assert sorted(i for i, _ in seen) == list(range(5))
    assert all(count >= 1 for _, count in seen)
    fresh = LocalBackend(str(tiny_model_dir), device="cpu")
    again = CachedBackend(fresh, path).complete(reqs)
    assert all(c.cached for c in again) and [c.text for c in again] == [c.text for c in out]
    assert fresh._loaded is None  # all hits: the model was never loaded
