"""Reliability: the faults a run must survive, each provoked for real.

- the optimizer endpoint down / answering garbage, 5xx and timeouts / rate limiting, at the
  pipeline level (one tiny round on a temporary Dagster instance, the openai backend pointed
  at the scripted local server of ``core/fake_openai_server.py``);
- ``kill -9`` of a process in the middle of the optimizer (the SQLite cache resumes it) and in
  the middle of a table write (the final path is never a partial file);
- a full disk and unwritable storage (a clear ``StorageError``, nothing written);
- two runs of the same round at once (``RoundBusy``; the instance queues one run per partition).
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import yaml
from dagster import AssetKey, DagsterInstance

from middo_pipeline import definitions, preflight
from middo_pipeline.core.storage import Storage, StorageError
from middo_pipeline.loop import DAGSTER_YAML, RoundBusy, ensure_dagster_home, run_rounds
from middo_pipeline.resources import OptimizerResource
from middo_pipeline.rounds import latest_materialization
from middo_pipeline_tests.conftest import REPO, SEED_FILE, small_tiny_run, tiny_profile_env
from middo_pipeline_tests.core.fake_openai_server import FakeOpenAI, Reply, chat_ok, closed_port, error, last_user

ROUND = "round-1"
OPT_TIMEOUT_S = 2.0  # per-attempt timeout of the optimizer client in these tests
OPT_RETRIES = 1
OPTIMIZE_ASSETS = {
    AssetKey("refinement_candidates"),
    AssetKey("refined_samples"),
    AssetKey("optimized_dataset"),
    AssetKey("sample_accounting"),
}
PROMPT_SYSTEM_MARK = "training data"  # in the stepwise system prompt, not in the response-step one


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def good_answer(body: dict) -> Reply:
    """A deterministic, parseable answer that depends only on the request's content."""
    user = last_user(body)
    system = body["messages"][0]["content"] if body.get("messages") else ""
    if PROMPT_SYSTEM_MARK in system:
        return chat_ok(
            f"1. Problems: none.\n### Final prompt\nExplain topic {_h(user)} step by step, with one example."
        )
    return chat_ok(f"Here is a careful answer about topic {_h(user)}: first this, then that.")


def _tables(store: Storage, asset: str) -> list[str]:
    folder = store.tables_dir / asset
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# a. the optimizer endpoint misbehaves: one tiny round, then the optimize step re-run per fault
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, model_cache):
    """A tiny-profile environment with the openai optimizer backend, short timeouts, 1 retry."""
    tmp = tmp_path_factory.mktemp("faults")
    seed, cfg = small_tiny_run(tmp)
    # transport faults with one candidate per operation: every request the server sees maps to one
    # candidate and one row; the tests read whether it was generated, not what the gate decided
    # (the gate's decisions are tested in test_verify / test_loop_tiny)
    cfg["ops"]["refined_samples"]["config"].update(candidates=1, temperature=0.0)
    env = tiny_profile_env(
        tmp,
        model_cache,
        MIDDO_OPTIMIZER_BACKEND="openai",
        MIDDO_OPTIMIZER_MODEL="test-model",
        MIDDO_OPTIMIZER_API_KEY_ENV="MIDDO_FAULTS_TEST_KEY",
    )
    original = definitions.resources_from_env

    def fast_resources(env=None):  # the env has no knobs for timeout / retries: set them here
        res = original(env)
        opt = res["optimizer"]
        res["optimizer"] = OptimizerResource(
            backend=opt.backend,
            model=opt.model,
            base_url=opt.base_url,
            api_key_env=opt.api_key_env,
            max_concurrency=opt.max_concurrency,
            device=opt.device,
            timeout_s=OPT_TIMEOUT_S,
            max_retries=OPT_RETRIES,
        )
        return res

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setattr(definitions, "resources_from_env", fast_resources)
        # the scripted server's listen backlog (socketserver's default: 5) drops connections when 8
        # requests plus their retries arrive at once; a dropped SYN reads as a timeout, not a fault
        mp.setattr(http.server.ThreadingHTTPServer, "request_queue_size", 128)
        yield SimpleNamespace(env=env, tmp=tmp, seed=seed, cfg=cfg, store=Storage(env["MIDDO_HOME"]))


def _rerun_optimize(pipeline, url: str):
    """Materialize refined_samples + optimized_dataset (+ accounting) of round-1 again, against ``url``:
    the same job and assets as the round, upstream tables read from storage."""
    env = {**pipeline.env, "MIDDO_OPTIMIZER_BASE_URL": url}
    job = definitions.build_defs(env).resolve_job_def("middo_round").get_subset(asset_selection=OPTIMIZE_ASSETS)
    run_config = {
        "ops": {"refined_samples": pipeline.cfg["ops"]["refined_samples"]},
        "resources": pipeline.cfg["resources"],
    }
    with DagsterInstance.get() as instance:
        return job.execute_in_process(
            instance=instance, partition_key=ROUND, run_config=run_config, raise_on_error=False
        )


def _metadata(asset: str) -> dict:
    with DagsterInstance.get() as instance:
        rec = latest_materialization(instance, asset, ROUND)
        return {k: v.value for k, v in rec.asset_materialization.metadata.items()}


@pytest.fixture(scope="module")
def endpoint_down(pipeline):
    """(i) the whole round against a closed port."""
    url = f"http://127.0.0.1:{closed_port()}/v1"
    env = {**pipeline.env, "MIDDO_OPTIMIZER_BASE_URL": url}
    logs: list[str] = []
    # the server goes down after the preflight probed it (a server down from the start is refused
    # by the preflight before anything runs: test_hostile.test_openai_server_down_is_refused)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError) as info:
        mp.setattr(preflight, "check_optimizer", lambda *args, **kwargs: None)
        run_rounds(1, seed_path=str(pipeline.seed), config=pipeline.cfg, env=env, log=logs.append)
    return SimpleNamespace(url=url, error=str(info.value), logs=logs)


def test_endpoint_down_stops_the_round_cleanly(pipeline, endpoint_down):
    msg = endpoint_down.error
    assert endpoint_down.url in msg, msg
    assert "refined_samples" in msg and "cannot connect" in msg, msg
    store = pipeline.store
    # the work before the optimizer is kept (a rerun resumes from it) ...
    assert store.table_path("loss_signals", ROUND).exists()
    assert (store.checkpoint_dir(ROUND) / "config.json").exists()
    # ... and nothing of the optimize stage exists, not even a partial or temporary file
    for asset in ("refined_samples", "optimized_dataset", "sample_accounting"):
        assert not store.table_path(asset, ROUND).exists(), asset
        assert _tables(store, asset) == [], asset
    with DagsterInstance.get() as instance:
        assert latest_materialization(instance, "optimized_dataset", ROUND) is None
        assert latest_materialization(instance, "sft_checkpoint", ROUND) is not None


GARBAGE_REASONS = {
    "llm error: http 500 after 1 retries",
    "llm error: http 503 after 1 retries",
    "llm error: malformed response",
    f"llm error: timeout ({OPT_TIMEOUT_S:g}s) after {OPT_RETRIES} retries",
}


@pytest.fixture(scope="module")
def endpoint_garbage(pipeline, endpoint_down):
    """(ii) every request fails: 5xx (JSON and HTML), 200 with invalid JSON or no choices, too slow.
    Each distinct request gets one kind (in the order first seen), its retries the same."""
    kinds: dict[str, int] = {}

    def chat(body: dict, n: int) -> Reply:
        key = json.dumps(body.get("messages"), sort_keys=True)
        kind = kinds.setdefault(key, len(kinds) % 5)
        if kind == 0:
            return error(500, "internal error")
        if kind == 1:
            return Reply(503, "<html><body>Bad Gateway</body></html>", content_type="text/html")
        if kind == 2:
            return Reply(200, '{"id": "x", "choices": [{"message": ', content_type="application/json")
        if kind == 3:
            return Reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []})
        return Reply(200, {"never": "sent in time"}, delay=OPT_TIMEOUT_S + 1.5)

    fake = FakeOpenAI()
    fake.chat = chat
    fake.models_status = 500  # /models is broken too: the probe falls back to a completion, then goes on
    fake.start()
    try:
        res = _rerun_optimize(pipeline, fake.url)
    finally:
        fake.stop()
    return SimpleNamespace(res=res, fake=fake)


def test_endpoint_garbage_keeps_every_original(pipeline, endpoint_garbage):
    res = endpoint_garbage.res
    assert res.success
    store = pipeline.store
    refined = pl.read_parquet(store.table_path("refined_samples", ROUND))
    assert refined.height > 0 and refined["status"].unique().to_list() == ["failed"]
    counts = dict(refined.group_by("failure_reason").len().iter_rows())
    md = _metadata("refined_samples")
    assert md["attempted"] == md["failed"] == refined.height and md["accepted"] == 0
    assert md["rejected_or_failed_by_reason"] == counts  # counted by reason in the metadata
    # every candidate's failure is kept, named by its reason
    cands = pl.read_parquet(store.table_path("refinement_candidates", ROUND))
    assert cands.height == refined.height and not cands["passed"].any()
    assert set(cands["failure_reason"].to_list()) == GARBAGE_REASONS

    # conservation: the optimized dataset is the round's input, every original kept
    before = pl.read_parquet(store.table_path("round_dataset", ROUND))
    after = pl.read_parquet(store.table_path("optimized_dataset", ROUND))
    assert sorted(after["sample_id"].to_list()) == sorted(before["sample_id"].to_list())
    for col in ("instruction", "input", "output"):
        assert dict(zip(after["sample_id"], after[col])) == dict(zip(before["sample_id"], before[col]))
    acc = pl.read_parquet(store.table_path("sample_accounting", ROUND))
    assert sorted(acc["sample_id"].to_list()) == sorted(before["sample_id"].to_list())
    checks = {e.check_name: e.passed for e in res.get_asset_check_evaluations()}
    assert checks.get("conservation") is True, checks


@pytest.fixture(scope="module")
def endpoint_rate_limited(pipeline, endpoint_garbage):
    """(iii) every distinct request is answered 429 the first time, then properly."""
    seen: set[str] = set()

    def chat(body: dict, n: int) -> Reply:
        key = json.dumps(body.get("messages"), sort_keys=True)
        if key not in seen:
            seen.add(key)
            return error(429, "slow down", code="rate_limit_exceeded")
        return good_answer(body)

    fake = FakeOpenAI()
    fake.chat = chat
    fake.start()
    try:
        res = _rerun_optimize(pipeline, fake.url)
    finally:
        fake.stop()
    return SimpleNamespace(res=res, fake=fake, distinct=len(seen))


def test_rate_limited_endpoint_succeeds_after_retry(pipeline, endpoint_rate_limited):
    res, fake = endpoint_rate_limited.res, endpoint_rate_limited.fake
    assert res.success
    store = pipeline.store
    refined = pl.read_parquet(store.table_path("refined_samples", ROUND))
    assert refined.height > 0
    # every candidate was generated (none failed); the gate then accepted or rejected each
    cands = pl.read_parquet(store.table_path("refinement_candidates", ROUND))
    assert cands.height == refined.height
    assert cands["status"].unique().to_list() == ["ok"], cands["failure_reason"].unique().to_list()
    assert set(refined["status"].to_list()) <= {"ok", "rejected"}
    # each request was refused once, then retried: 2 calls per distinct request (both stages,
    # and prompt_style auto's one probe)
    assert endpoint_rate_limited.distinct == 2 * refined.height + 1
    assert len(fake.chat_calls) == 2 * endpoint_rate_limited.distinct
    md = _metadata("refined_samples")
    assert md["failed"] == 0 and md["accepted"] + md["rejected"] == refined.height

    before = pl.read_parquet(store.table_path("round_dataset", ROUND))
    after = pl.read_parquet(store.table_path("optimized_dataset", ROUND))
    out_ids = set(after["sample_id"].to_list())
    accepted = refined.filter(pl.col("status") == "ok")
    replaced = accepted.filter(pl.col("operation").is_in(["simplified", "rewritten"]))
    assert set(replaced["new_sample_id"].to_list()) <= out_ids
    assert not set(replaced["origin_id"].to_list()) & out_ids  # replaced, not kept beside
    extended = set(accepted.filter(pl.col("operation") == "extended")["new_sample_id"].to_list())
    assert set(after.filter(pl.col("operation") == "extended")["sample_id"].to_list()) <= extended
    origins = set(after["origin_id"].to_list())
    assert all(sid in out_ids or sid in origins for sid in before["sample_id"].to_list())


# ---------------------------------------------------------------------------------------------
# b. kill -9 in the middle of the optimizer: the cache resumes, only missing requests are sent
# ---------------------------------------------------------------------------------------------

OPTIMIZER_CHILD = textwrap.dedent(
    """
    import json, sys
    import polars as pl
    from middo_pipeline.core.llm.openai_compat import OpenAIBackend
    from middo_pipeline.core.llm.cache import CachedBackend, CompletionCache
    from middo_pipeline.core.optimizer.operations import run_operations
    from middo_pipeline.core.optimizer.prompts import PromptConfig

    a = json.loads(sys.argv[1])
    backend = CachedBackend(OpenAIBackend(a["url"], "test-model", max_concurrency=1, timeout=30, max_retries=0),
                            CompletionCache(a["cache"]))
    out = run_operations(pl.read_parquet(a["samples"]), pl.read_parquet(a["plan"]), a["neighbors"], backend,
                         PromptConfig(style="stepwise"), round_number=1)
    out.write_parquet(a["out"])
    print("finished", flush=True)
    """
)


def _run_ops(url: str, cache: Path, samples: pl.DataFrame, plan: pl.DataFrame, neighbors: dict) -> pl.DataFrame:
    from middo_pipeline.core.llm.cache import CachedBackend, CompletionCache
    from middo_pipeline.core.llm.openai_compat import OpenAIBackend
    from middo_pipeline.core.optimizer.operations import run_operations
    from middo_pipeline.core.optimizer.prompts import PromptConfig

    backend = CachedBackend(
        OpenAIBackend(url, "test-model", max_concurrency=1, timeout=30, max_retries=0), CompletionCache(cache)
    )
    try:
        return run_operations(samples, plan, neighbors, backend, PromptConfig(style="stepwise"), round_number=1)
    finally:
        backend.cache.close()


def _cache_rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_sigkill_mid_optimizer_resumes_from_cache(tmp_path):
    from middo_pipeline.core.ingest import read_seed
    from middo_pipeline.core.optimizer.operations import plan_operations

    samples = read_seed(str(SEED_FILE)).samples.head(8)
    ids = samples["sample_id"].to_list()
    neighbors = {sid: [ids[(i + 1) % 8], ids[(i + 2) % 8]] for i, sid in enumerate(ids)}
    plan = plan_operations(samples, ids[:3], ids[3:6], ids[6:], neighbors)
    n_ops = plan.height
    samples.write_parquet(tmp_path / "samples.parquet")
    plan.write_parquet(tmp_path / "plan.parquet")

    delay = {"s": 0.0}

    def chat(body: dict, n: int) -> Reply:
        reply = good_answer(body)
        reply.delay = delay["s"]
        return reply

    fake = FakeOpenAI()
    fake.chat = chat
    fake.start()
    try:
        # the uninterrupted run (fast server, its own cache)
        reference = _run_ops(fake.url, tmp_path / "ref.sqlite", samples, plan, neighbors)
        total = len(fake.chat_calls)
        assert total == 2 * n_ops and reference["status"].unique().to_list() == ["ok"]

        # the same work in a child process against a slow server, killed after a few completions
        delay["s"] = 0.3
        cache = tmp_path / "cache.sqlite"
        args = {
            "url": fake.url,
            "cache": str(cache),
            "samples": str(tmp_path / "samples.parquet"),
            "plan": str(tmp_path / "plan.parquet"),
            "neighbors": neighbors,
            "out": str(tmp_path / "child.parquet"),
        }
        calls_before = len(fake.chat_calls)
        child = subprocess.Popen(
            [sys.executable, "-c", OPTIMIZER_CHILD, json.dumps(args)],
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while _cache_rows(cache) < 3:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child cached nothing in 60 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL and b"finished" not in out
        assert not (tmp_path / "child.parquet").exists()
        cached_at_kill = _cache_rows(cache)
        assert 3 <= cached_at_kill < n_ops, "the kill must land in the middle of the prompt stage"
        sent_by_child = len(fake.chat_calls) - calls_before
        assert sent_by_child >= cached_at_kill

        # the rerun sends only what the cache does not hold
        delay["s"] = 0.0
        calls_before = len(fake.chat_calls)
        resumed = _run_ops(fake.url, cache, samples, plan, neighbors)
        assert len(fake.chat_calls) - calls_before == total - cached_at_kill
    finally:
        fake.stop()

    assert resumed["prompt_cached"].sum() == cached_at_kill
    # the same table as the uninterrupted run; nothing twice
    flags = ["prompt_cached", "response_cached"]
    assert resumed.drop(flags).equals(reference.drop(flags))
    assert resumed.select("origin_id", "operation").is_duplicated().sum() == 0
    assert _cache_rows(cache) == total  # one row per distinct request
    with sqlite3.connect(cache) as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM completions")]
    assert len(keys) == len(set(keys)) == total


# ---------------------------------------------------------------------------------------------
# c. kill -9 during a table write: the final path is absent or a complete version, never partial
# ---------------------------------------------------------------------------------------------

SLOW_WRITE_CHILD = textwrap.dedent(
    """
    import io, os, sys, time
    from pathlib import Path
    import polars as pl
    from middo_pipeline.core.storage import Storage

    root, final, rows = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    df = pl.DataFrame({"i": range(rows)}).with_columns(s=pl.col("i").cast(pl.String) + "-payload", version=pl.lit(2))
    real = pl.DataFrame.write_parquet

    def slow_disk(self, file, *args, **kwargs):  # the real bytes, written slowly (a slow disk)
        buf = io.BytesIO()
        real(self, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(file, "wb") as fh:
            for i in range(0, len(data), 32768):
                fh.write(data[i:i + 32768])
                fh.flush()
                os.fsync(fh.fileno())
                time.sleep(0.02)

    pl.DataFrame.write_parquet = slow_disk
    print("size", len(df), flush=True)
    Storage(root).write_table(df, final)
    print("finished", flush=True)
    """
)

LOOP_WRITE_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import polars as pl
    from middo_pipeline.core.storage import Storage

    root, final, rows = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    store = Storage(root)
    base = pl.DataFrame({"i": range(rows)}).with_columns(s=pl.col("i").cast(pl.String) + "-payload")
    for v in range(10_000):
        store.write_table(base.with_columns(version=pl.lit(v)), final)
        print(v, flush=True)
    """
)


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")] if folder.exists() else []


def _kill_when_partial(child: subprocess.Popen, folder: Path, min_bytes: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert child.poll() is None, f"the writer ended before it was killed: {child.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no partial temporary file appeared in 60 s"
        tmps = _tmp_files(folder)
        if tmps and tmps[0].stat().st_size >= min_bytes:
            break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def test_sigkill_during_write_never_leaves_a_partial_table(tmp_path):
    store = Storage(tmp_path / "home")
    final = store.table_path("optimized_dataset", ROUND)
    folder = final.parent
    rows = 300_000

    def slow_child():
        return subprocess.Popen(
            [sys.executable, "-c", SLOW_WRITE_CHILD, str(store.root), str(final), str(rows)],
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    # no previous version: after the kill the final path does not exist
    _kill_when_partial(slow_child(), folder, 64 * 1024)
    assert not final.exists()
    leftovers = _tmp_files(folder)
    assert leftovers and all(p.name.startswith(f".{final.name}.") for p in leftovers)
    with pytest.raises(Exception):  # noqa: B017 - any polars read error: the leftover really is a torn file ...
        pl.read_parquet(leftovers[0])
    with pytest.raises(StorageError, match="not found"):  # ... and the reader never looks at it
        store.read_table(final)
    assert [p.name for p in folder.glob("*.parquet")] == []

    # a previous version exists: after the kill it is still there, complete and unchanged
    previous = pl.DataFrame({"i": [1, 2, 3], "s": ["a", "b", "c"], "version": [1, 1, 1]})
    store.write_table(previous, final)
    _kill_when_partial(slow_child(), folder, 64 * 1024)
    assert store.read_table(final).equals(previous)
    assert [p.name for p in folder.glob("*.parquet")] == [final.name]
    assert all(p.name.startswith(".") for p in folder.iterdir() if p != final)  # temp names are hidden

    # real (unslowed) writes, over and over, killed at an arbitrary moment: always one whole version
    child = subprocess.Popen(
        [sys.executable, "-c", LOOP_WRITE_CHILD, str(store.root), str(final), "200000"],
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout.readline().strip() == b"0", child.stderr.read().decode()[-2000:]
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    got = store.read_table(final)
    assert got.height == 200_000 and got["version"].n_unique() == 1
    assert got["i"].to_list() == list(range(200_000))


# ---------------------------------------------------------------------------------------------
# d. disk full, unwritable storage
# ---------------------------------------------------------------------------------------------


def _no_space(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_at_storage_level(tmp_path, monkeypatch):
    store = Storage(tmp_path / "home")
    final = store.table_path("seed_dataset")
    previous = pl.DataFrame({"a": [1, 2]})
    store.write_table(previous, final)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", _no_space)
    with pytest.raises(StorageError) as info:
        store.write_table(pl.DataFrame({"a": [3, 4, 5]}), final)
    assert "disk full" in str(info.value) and str(final) in str(info.value)
    monkeypatch.undo()
    assert store.read_table(final).equals(previous)  # the old version survives
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]  # no temp file left behind

    # a new partition folder: nothing at all is left in it
    monkeypatch.setattr(pl.DataFrame, "write_parquet", _no_space)
    part = store.table_path("optimized_dataset", ROUND)
    with pytest.raises(StorageError, match="disk full"):
        store.write_table(pl.DataFrame({"a": [1]}), part)
    assert list(part.parent.iterdir()) == []


def test_read_only_storage_at_storage_level(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)
    try:
        if os.access(home, os.W_OK):  # root ignores the mode bits: simulate what a user sees
            real_mkdir, real_access = Path.mkdir, os.access

            def mkdir(self, *args, **kwargs):
                if str(self).startswith(str(home) + os.sep) and not self.exists():
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                return real_mkdir(self, *args, **kwargs)

            monkeypatch.setattr(Path, "mkdir", mkdir)
            monkeypatch.setattr(
                os,
                "access",
                lambda p, mode, *a, **k: (
                    False if str(p).startswith(str(home)) and mode & os.W_OK else real_access(p, mode, *a, **k)
                ),
            )
        store = Storage(home)
        with pytest.raises(StorageError) as info:
            store.write_table(pl.DataFrame({"a": [1]}), store.table_path("seed_dataset"))
        assert str(home / "tables") in str(info.value)
        assert "permission denied" in str(info.value).lower() or "not writable" in str(info.value)
        with pytest.raises(StorageError, match="not writable|[Pp]ermission denied"):
            store.lock("round", ROUND)
    finally:
        home.chmod(0o700)
    assert not (home / "tables").exists()

    # a read-only file system under an existing folder: the rename target cannot be created
    store = Storage(tmp_path / "rofs")
    store.ensure_dir(store.tables_dir)

    def read_only_fs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("middo_pipeline.atomic.tempfile.mkstemp", read_only_fs)
    with pytest.raises(StorageError, match="permission denied") as info:
        store.write_table(pl.DataFrame({"a": [1]}), store.table_path("seed_dataset"))
    assert str(store.table_path("seed_dataset")) in str(info.value)


@pytest.fixture
def seed_env(tmp_path, monkeypatch, small_seed):
    env = {
        "MIDDO_PROFILE": "tiny",
        "MIDDO_HOME": str(tmp_path / "middo"),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return SimpleNamespace(env=env, seed=small_seed, store=Storage(env["MIDDO_HOME"]))


def _materialize_seed(seed_env):
    job = definitions.build_defs(seed_env.env).resolve_job_def("seed_job")
    with DagsterInstance.ephemeral() as instance:
        res = job.execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config={"ops": {"seed_dataset": {"config": {"path": str(seed_env.seed)}}}},
        )
        errors = [e.step_failure_data.error for e in res.all_events if e.is_step_failure]
        text = " ".join(_chain(err) for err in errors)
        mats = instance.get_latest_materialization_event(AssetKey("seed_dataset"))
    return res, text, mats


def _chain(err) -> str:
    parts = []
    while err is not None:
        parts.append(f"{err.cls_name}: {err.message}")
        err = err.cause
    return " <- ".join(parts)


def _written(store: Storage) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.is_file()] if store.root.exists() else []


def test_disk_full_at_asset_level(seed_env, monkeypatch):
    monkeypatch.setattr(pl.DataFrame, "write_parquet", _no_space)
    res, text, mats = _materialize_seed(seed_env)
    assert not res.success and mats is None
    assert "StorageError" in text and "disk full" in text and str(seed_env.store.table_path("seed_dataset")) in text
    assert _written(seed_env.store) == []  # nothing written, no temp file either

    # and what `middo loop` prints says so too
    with pytest.raises(RuntimeError) as info:
        run_rounds(1, seed_path=str(seed_env.seed), env=seed_env.env, log=lambda m: None)
    assert "disk full" in str(info.value) and "seed_dataset" in str(info.value), str(info.value)
    assert _written(seed_env.store) == []


def test_unwritable_storage_at_asset_level(seed_env, monkeypatch):
    home = seed_env.store.root
    home.mkdir(parents=True)
    home.chmod(0o500)
    try:
        if os.access(home, os.W_OK):  # root: simulate the permission errors a user would get
            real_mkdir, real_access = Path.mkdir, os.access

            def mkdir(self, *args, **kwargs):
                if str(self).startswith(str(home) + os.sep) and not os.path.exists(self):
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                return real_mkdir(self, *args, **kwargs)

            monkeypatch.setattr(Path, "mkdir", mkdir)
            monkeypatch.setattr(
                os,
                "access",
                lambda p, mode, *a, **k: (
                    False if str(p).startswith(str(home)) and mode & os.W_OK else real_access(p, mode, *a, **k)
                ),
            )
        res, text, mats = _materialize_seed(seed_env)
    finally:
        home.chmod(0o700)
    assert not res.success and mats is None
    assert "StorageError" in text and str(home / "tables") in text, text
    assert "permission denied" in text.lower() or "not writable" in text
    assert _written(seed_env.store) == []


# ---------------------------------------------------------------------------------------------
# e. two runs of one round at once
# ---------------------------------------------------------------------------------------------


def test_same_round_twice_at_once_is_refused(seed_env):
    lock = seed_env.store.lock("round", ROUND)
    lock.acquire(timeout=0)  # "another process" is running round-1
    try:
        with pytest.raises(RoundBusy) as info:
            run_rounds(1, seed_path=str(seed_env.seed), env=seed_env.env, log=lambda m: None)
    finally:
        lock.release()
    msg = str(info.value)
    assert ROUND in msg and "another process" in msg and str(lock.lock_file) in msg
    with DagsterInstance.get() as instance:  # the refused round never started a run
        assert not [r for r in instance.get_runs() if r.job_name == "middo_round"]
    # the lock is free again afterwards
    again = seed_env.store.lock("round", ROUND)
    again.acquire(timeout=0)
    again.release()


def test_instance_queues_one_run_per_round_partition(tmp_path, monkeypatch):
    cfg = yaml.safe_load(DAGSTER_YAML)
    coord = cfg["run_coordinator"]
    assert coord["class"] == "QueuedRunCoordinator"
    limits = coord["config"]["tag_concurrency_limits"]
    assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    home = ensure_dagster_home()
    assert yaml.safe_load((home / "dagster.yaml").read_text()) == cfg
    with DagsterInstance.get() as instance:
        coordinator = instance.run_coordinator
        assert type(coordinator).__name__ == "QueuedRunCoordinator"
        rules = coordinator.get_run_queue_config().tag_concurrency_limits
        assert any(r["key"] == "dagster/partition" and r["limit"] == 1 for r in rules), rules
