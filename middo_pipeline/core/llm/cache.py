"""A persistent cache of LLM completions, and a backend wrapper that uses it.

``CompletionCache`` is one SQLite file (stdlib ``sqlite3``, WAL journal, busy timeout): one row
per cache key with the backend id, the request as JSON, the text, the usage as JSON and the
creation time. Every thread gets its own connection (and every forked process), so threads
and processes may read and write at the same time. Only successful completions are stored:
an error is retried on the next run. (WAL needs a local filesystem, not NFS.)

``CachedBackend`` wraps any ``LLMBackend``: hits come back with ``cached=True`` and only the
misses (deduplicated) go to the inner backend; each success is written as soon as the inner
backend delivers it (per HTTP future, per local batch), so a crash mid-batch keeps what was
done and a rerun sends only the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from middo_pipeline.core.llm.protocol import ChatRequest, Completion, LLMBackend

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key        TEXT PRIMARY KEY,
    backend_id TEXT NOT NULL,
    request    TEXT NOT NULL,
    text       TEXT NOT NULL,
    usage      TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS completions_backend ON completions(backend_id);
"""
_CHUNK = 500  # keys per SELECT ... IN (...): below SQLite's variable limit


class CompletionCache:
    def __init__(self, path: str | Path, timeout_s: float = 60.0):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = float(timeout_s)
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._conns: list[tuple[int, sqlite3.Connection]] = []
        self._retry(lambda c: c.executescript(_SCHEMA))

    def __repr__(self) -> str:
        return f"CompletionCache({str(self.path)!r})"

    # -- connections -------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._tls, "conn", None)
        if conn is not None and getattr(self._tls, "pid", None) == os.getpid():
            return conn
        # autocommit mode: every statement is its own transaction unless BEGIN is explicit
        conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        self._retry(lambda c: c.execute("PRAGMA journal_mode=WAL"), conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        self._tls.conn, self._tls.pid = conn, os.getpid()
        with self._lock:
            self._conns.append((os.getpid(), conn))
        return conn

    def _retry(self, fn, conn: sqlite3.Connection | None = None):
        """Run ``fn(conn)``, retrying 'database is locked' beyond the busy handler
        (switching to WAL and creating the schema take locks the handler does not always cover)."""
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while True:
            try:
                return fn(conn if conn is not None else self._conn())
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def close(self) -> None:
        """Close the connections this process opened (the cache stays usable: they reopen)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for pid, conn in conns:
            if pid == os.getpid():
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
        self._tls = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading -----------------------------------------------------------------------------
    def get(self, key: str) -> Completion | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, Completion] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._retry(
                lambda c, marks=marks, chunk=chunk: c.execute(
                    f"SELECT key, text, usage FROM completions WHERE key IN ({marks})", chunk
                ).fetchall()
            )
            for key, text, usage in rows:
                try:
                    usage_d = json.loads(usage) if usage else {}
                except ValueError:
                    usage_d = {}
                found[key] = Completion(text=text, cached=True, usage=usage_d)
        return found

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return self._retry(lambda c: c.execute("SELECT COUNT(*) FROM completions").fetchone()[0])

    def count(self, backend_id: str | None = None) -> int:
        if backend_id is None:
            return len(self)
        return self._retry(
            lambda c: c.execute("SELECT COUNT(*) FROM completions WHERE backend_id = ?", (backend_id,)).fetchone()[0]
        )

    # -- writing -----------------------------------------------------------------------------
    @staticmethod
    def _row(key: str, backend_id: str, request: ChatRequest | dict | None, completion: Completion) -> tuple:
        if isinstance(request, ChatRequest):
            req = dataclasses.asdict(request)
        else:
            req = request or {}
        return (
            key,
            backend_id,
            json.dumps(req, ensure_ascii=False, sort_keys=True),
            completion.text,
            json.dumps(completion.usage or {}, ensure_ascii=False, sort_keys=True, default=str),
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def put(self, key: str, backend_id: str, request: ChatRequest | dict | None, completion: Completion) -> bool:
        """Store one successful completion; errors are not stored (returns False)."""
        return self.put_many([(key, backend_id, request, completion)]) == 1

    def put_many(self, items: Iterable[tuple[str, str, ChatRequest | dict | None, Completion]]) -> int:
        rows = [self._row(*it) for it in items if it[3].ok]
        if not rows:
            return 0

        def write(c: sqlite3.Connection):
            c.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on upgrade
            try:
                c.executemany(
                    "INSERT OR REPLACE INTO completions (key, backend_id, request, text, usage, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        self._retry(write)
        return len(rows)

    def delete(self, backend_id: str | None = None) -> int:
        """Forget every row (of one backend when given)."""
        if backend_id is None:
            cur = self._retry(lambda c: c.execute("DELETE FROM completions"))
        else:
            cur = self._retry(lambda c: c.execute("DELETE FROM completions WHERE backend_id = ?", (backend_id,)))
        return cur.rowcount


class CachedBackend:
    """Any ``LLMBackend`` with a persistent cache in front. Counters: ``hits``, ``misses``
    (requests not in the cache), ``errors`` (failed misses, not stored), ``stored``."""

    def __init__(self, backend: LLMBackend, cache: CompletionCache | str | Path):
        self.backend = backend
        self.cache = cache if isinstance(cache, CompletionCache) else CompletionCache(cache)
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.stored = 0
        self.generated_tokens = 0  # completion tokens the backend generated (not served from the cache)
        self._lock = threading.Lock()

    @property
    def backend_id(self) -> str:
        return self.backend.backend_id

    def __repr__(self) -> str:
        return f"CachedBackend({self.backend!r}, {self.cache!r})"

    def stats(self) -> dict:
        with self._lock:
            total = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "errors": self.errors,
                "stored": self.stored,
                "hit_rate": (self.hits / total) if total else 0.0,
                "generated_tokens": self.generated_tokens,
            }

    def complete(self, requests: Sequence[ChatRequest], progress=None, on_result=None) -> list[Completion]:
        requests = list(requests)
        n = len(requests)
        if n == 0:
            return []
        bid = self.backend_id
        keys = [r.cache_key(bid) for r in requests]
        found = self.cache.get_many(keys)
        results: list[Completion | None] = [None] * n
        pending: dict[str, list[int]] = {}  # miss key -> request indexes (duplicates share a call)
        for i, k in enumerate(keys):
            if k in found:
                results[i] = dataclasses.replace(found[k], usage=dict(found[k].usage))
            else:
                pending.setdefault(k, []).append(i)
        n_hits = n - sum(len(v) for v in pending.values())
        with self._lock:
            self.hits += n_hits
            self.misses += n - n_hits
        if on_result:
            for i in range(n):
                if results[i] is not None:
                    on_result(i, results[i])
        done = n_hits
        if progress and n_hits:
            progress(done, n)
        if not pending:
            return results  # type: ignore[return-value]
        if n_hits:
            log.info("completion cache: %d/%d hits, sending %d requests to %s", n_hits, n, len(pending), bid)

        miss_keys = list(pending)
        miss_reqs = [requests[pending[k][0]] for k in miss_keys]
        delivered: set[int] = set()

        def deliver(j: int, comp: Completion) -> None:
            nonlocal done
            if j in delivered:
                return
            delivered.add(j)
            key = miss_keys[j]
            if comp.ok:
                self.cache.put(key, bid, miss_reqs[j], comp)
            idxs = pending[key]
            with self._lock:
                if comp.ok:
                    self.stored += 1
                    self.generated_tokens += int((comp.usage or {}).get("completion_tokens") or 0)
                else:
                    self.errors += len(idxs)
            for i in idxs:
                results[i] = dataclasses.replace(comp, usage=dict(comp.usage or {}))
                if on_result:
                    on_result(i, results[i])
            done += len(idxs)

        reported = n_hits

        def report(*_) -> None:
            # when the backend says so (after a batch, not after each result of it: a progress
            # line written at the first result of a batch reads "1/284, ETA 4 hours")
            nonlocal reported
            if progress and done != reported:
                reported = done
                progress(done, n)

        out = self.backend.complete(miss_reqs, progress=report, on_result=deliver)
        if len(out) != len(miss_reqs):
            raise RuntimeError(f"backend {bid} returned {len(out)} completions for {len(miss_reqs)} requests")
        for j, comp in enumerate(out):  # what the backend did not deliver through on_result
            deliver(j, comp)
        report()
        return results  # type: ignore[return-value]
