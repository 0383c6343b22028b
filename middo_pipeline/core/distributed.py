"""The per-sample forward passes on a Ray cluster: one model replica per worker, samples in
length-sorted shards, results gathered back in the caller's order.

``RayForward(model_path, ...)`` keeps a pool of Ray actors (``ray.util.ActorPool``), each of
which loads the model once (``models.loading.load_model``) and runs ``forward.score_samples``
on the shards it is given. A shard is a run of samples that are adjacent in the length order
(characters of prompt + response), so that every worker's batches are as evenly padded as on
one machine; each worker batches its shard again by tokens (``forward.make_batches``). What
comes back is the same ``ForwardResult`` as ``score_samples`` gives for the whole list.

Nothing here schedules, retries or moves data by hand: Ray places the actors (``num_cpus`` /
``num_gpus`` per worker), restarts an actor whose process died (``max_restarts``) and re-runs
the task it was running (``max_task_retries``), and carries the arrays back through its object
store. A shard's rows are written into the result at their original positions, and every
position must be written exactly once, so a retried shard cannot duplicate or lose a row.

Paths are read by the workers: on a cluster of several machines the model and checkpoint
folders must be on a filesystem every node sees (the same ``MIDDO_HOME`` everywhere). Ray is
an optional dependency (``pip install 'middo-pipeline[ray]'``); this module imports it only
when a pool is made. Dagster-free: the ``ray`` resource (``middo_pipeline.resources``) builds
one of these from its settings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from middo_pipeline.core.forward import ForwardResult

__all__ = ["LocalForward", "RaySettings", "RayForward", "RayGeneration", "plan_shards"]

Progress = Callable[[int, int], None]


@dataclass
class LocalForward:
    """The one-process counterpart of ``RayForward``: the same methods on a loaded model."""

    lm: object  # models.loading.LoadedModel
    workers: int = 0

    def score_samples(self, prompts, responses, **kwargs) -> ForwardResult:
        from middo_pipeline.core.forward import score_samples

        return score_samples(self.lm.model, self.lm.tokenizer, prompts, responses, **kwargs)

    def unconditional_loss(self, responses, **kwargs) -> ForwardResult:
        from middo_pipeline.core.ifd import unconditional_loss

        return unconditional_loss(self.lm.model, self.lm.tokenizer, responses, **kwargs)

    def expected_scores(self, prompts, responses, **kwargs) -> np.ndarray:
        from middo_pipeline.core import quality

        return quality.expected_scores(self.lm.model, self.lm.tokenizer, prompts, responses, **kwargs)

    def close(self) -> None:
        self.lm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class RaySettings:
    """How the model work spreads over the cluster.

    ``workers``: model replicas (0: as many as the cluster has room for, by ``num_cpus`` /
    ``num_gpus`` per worker). ``shards_per_worker``: shards per replica and pass (more: finer
    progress and load balance, a little more overhead). ``max_task_retries``: how often a
    shard is re-run when its worker dies (Ray restarts the worker, ``max_restarts`` times).
    ``fault_once_file``: for tests only; the first shard whose worker finds this file deletes it
    and kills its own process, as a crash in the middle of a pass would."""

    workers: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    shards_per_worker: int = 4
    max_task_retries: int = 3
    max_restarts: int = 3
    fault_once_file: str | None = None
    start_timeout_s: float = 900.0  # workers not placed and loaded by then: the step fails, saying why

    def replicas(self, cluster: dict) -> int:
        """The number of workers: ``workers`` when set, else what the cluster's resources hold."""
        if self.workers > 0:
            return self.workers
        by = []
        if self.num_gpus > 0:
            by.append(int(cluster.get("GPU", 0) // self.num_gpus))
        if self.num_cpus > 0:
            by.append(int(cluster.get("CPU", 0) // self.num_cpus))
        return max(1, min(by) if by else 1)


def plan_shards(lengths: Sequence[int], n_shards: int) -> list[np.ndarray]:
    """Split sample indices into ``n_shards`` runs of the length order (longest first), about
    equal in total length. Every index is in exactly one shard; empty shards are dropped."""
    n = len(lengths)
    if n == 0:
        return []
    n_shards = max(1, min(int(n_shards), n))
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    cost = np.asarray(lengths, dtype=np.float64)[order] + 1.0
    cum = np.cumsum(cost)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n_shards) / n_shards, side="left")
    parts = np.split(order, np.unique(np.clip(cuts + 1, 1, n - 1)))
    return [p for p in parts if p.size]


@dataclass
class _Shard:
    index: np.ndarray
    prompts: list[str]
    responses: list[str | None]


def _wait_started(refs: list, settings: RaySettings, what: str) -> list:
    """``ray.get`` the workers' first answers, or fail with the reason when some cannot start
    (more workers or bigger ones than the cluster can place) instead of waiting forever."""
    import ray

    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=settings.start_timeout_s)
    if pending:
        have = ray.cluster_resources()
        raise RuntimeError(
            f"ray: only {len(ready)} of {len(refs)} {what} workers started within {settings.start_timeout_s:.0f}s; "
            f"each asks for {settings.num_cpus:g} CPU and {settings.num_gpus:g} GPU, the cluster has "
            f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU: lower MIDDO_RAY_WORKERS or the per-worker "
            "resources, or add nodes"
        )
    return ray.get(refs)


def _worker_threads(kwargs: dict, st: RaySettings) -> dict:
    """A CPU worker uses the CPUs it reserved (unless told otherwise)."""
    kwargs = dict(kwargs)
    if st.num_gpus <= 0 and not kwargs.get("threads"):
        kwargs["threads"] = max(1, int(st.num_cpus))
    return kwargs


def _start_pool(owner: str, worker_cls, args: tuple, st: RaySettings, probe: str, what: str) -> tuple[list, list]:
    """``st.replicas`` actors of ``worker_cls(*args)``, each reserving the settings' CPUs/GPUs and
    restarted on a crash; waits until every one answers ``probe`` (a method without arguments)
    and returns the actors and their answers. Fails with the reason (and kills the actors that
    did start) when the cluster cannot place them."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{owner} needs a connected Ray cluster (ray.init / the 'ray' resource)")
    remote = ray.remote(
        num_cpus=st.num_cpus,
        num_gpus=st.num_gpus,
        max_restarts=st.max_restarts,
        max_task_retries=st.max_task_retries,
    )(worker_cls)
    actors = [remote.remote(*args) for _ in range(st.replicas(ray.cluster_resources()))]
    try:
        answers = _wait_started([getattr(a, probe).remote() for a in actors], st, what)
    except BaseException:
        _kill(actors)
        raise
    return actors, answers


def _actor_pool(actors: list):
    from ray.util import ActorPool

    return ActorPool(actors)


def _kill(actors: list) -> None:
    import ray

    for a in actors:
        ray.kill(a)


def _crash_once(path: str | None) -> None:
    """Fault injection for the tests: the first task to find ``path`` deletes it and kills
    its own worker process, as a crash in the middle of a pass would."""
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            return
        os._exit(1)


class _Worker:
    """One model replica (the body of a Ray actor)."""

    def __init__(self, model_path: str, load_kwargs: dict, fault_once_file: str | None):
        from middo_pipeline.models.loading import load_model

        self.lm = load_model(model_path, **load_kwargs)
        self.fault_once_file = fault_once_file

    def pid(self) -> int:
        return os.getpid()

    def score(self, shard: _Shard, kwargs: dict) -> tuple[np.ndarray, ForwardResult]:
        from middo_pipeline.core.forward import score_samples

        self._maybe_crash()
        res = score_samples(self.lm.model, self.lm.tokenizer, shard.prompts, shard.responses, **kwargs)
        return shard.index, res

    def judge(self, shard: _Shard, kwargs: dict) -> tuple[np.ndarray, np.ndarray, dict]:
        from middo_pipeline.core import quality

        self._maybe_crash()
        info: dict = {}
        six = quality.expected_scores(
            self.lm.model, self.lm.tokenizer, shard.prompts, shard.responses, info=info, **kwargs
        )
        return shard.index, six, info

    def _maybe_crash(self) -> None:
        _crash_once(self.fault_once_file)


@dataclass
class RayForward:
    """``score_samples`` for one model, on a pool of Ray workers (see the module docstring).

    ``load_kwargs`` go to ``load_model`` on each worker (device, dtype, threads, cache_dir);
    on a GPU worker leave ``device`` at ``auto``: Ray sets ``CUDA_VISIBLE_DEVICES`` to the
    worker's own GPU."""

    model_path: str
    settings: RaySettings = field(default_factory=RaySettings)
    load_kwargs: dict = field(default_factory=dict)
    log: Callable[[str], None] | None = None

    def __post_init__(self):
        kwargs = _worker_threads(self.load_kwargs, self.settings)
        t0 = time.perf_counter()
        self._actors, self._pids = _start_pool(
            "RayForward",
            _Worker,
            (self.model_path, kwargs, self.settings.fault_once_file),
            self.settings,
            "pid",
            "model",
        )
        self._pool = _actor_pool(self._actors)
        self.workers = len(self._actors)
        self._say(f"ray: {self.workers} worker(s) loaded {self.model_path} in {time.perf_counter() - t0:.1f}s")

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def score_samples(
        self,
        prompts: Sequence[str],
        responses: Sequence[str | None],
        *,
        progress: Progress | None = None,
        **kwargs,
    ) -> ForwardResult:
        """Same arguments and result as ``forward.score_samples`` (without the model and tokenizer)."""
        t0 = time.perf_counter()
        n = len(prompts)
        with_emb = kwargs.get("with_embeddings", True)
        loss = np.full(n, np.nan, dtype=np.float32)
        counts = np.zeros(n, dtype=np.int64)
        truncated = np.zeros(n, dtype=bool)
        emb: np.ndarray | None = None
        n_tokens, heads = 0, set()
        for idx, res in self._map("score", prompts, responses, kwargs, progress):
            loss[idx] = res.loss
            counts[idx] = res.n_response_tokens
            if res.truncated is not None:
                truncated[idx] = res.truncated
            if with_emb and res.embedding is not None:
                if emb is None:
                    emb = np.zeros((n, res.embedding.shape[1]), dtype=np.float32)
                emb[idx] = res.embedding
            n_tokens += res.n_tokens
            heads.add(res.head)
        if with_emb and emb is None:
            emb = np.zeros((0, 0), dtype=np.float32)
        return ForwardResult(
            loss=loss,
            n_response_tokens=counts,
            embedding=emb if with_emb else None,
            n_tokens=int(n_tokens),
            seconds=time.perf_counter() - t0,
            truncated=truncated,
            head="full" if "full" in heads else "fast",
        )

    def expected_scores(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        progress: Progress | None = None,
        info: dict | None = None,
        **kwargs,
    ) -> np.ndarray:
        """``quality.expected_scores`` (the self-judge's 6 judgements per sample, (N, 6)) on the
        pool; ``progress`` counts judgements; ``info`` gets ``judge_path`` (``packed`` when every
        shard took it, else the slowest path any shard took) and the shards' fallback reasons."""
        from middo_pipeline.core.quality import COLUMNS

        n, k = len(prompts), len(COLUMNS)
        out = np.full((n, k), np.nan, dtype=np.float64)
        paths, reasons = [], set()
        judged = None if progress is None else (lambda d, total: progress(d * k, total * k))
        for idx, six, shard_info in self._map("judge", prompts, responses, kwargs, judged):
            out[idx] = six
            paths.append(shard_info.get("judge_path", "packed"))
            if shard_info.get("fallback_reason"):
                reasons.add(str(shard_info["fallback_reason"]))
        if info is not None:
            order = ("whole", "per_judgement", "packed")
            info["judge_path"] = next((p for p in order if p in paths), "packed") if paths else "packed"
            if reasons:
                info["fallback_reason"] = "; ".join(sorted(reasons))
            info["ray_workers"] = self.workers
        return out

    def _map(self, method: str, prompts, responses, kwargs: dict, progress: Progress | None):
        """Yield ``(indices, *result)`` per shard as shards finish; every sample exactly once."""
        prompts, responses = list(prompts), list(responses)
        n = len(prompts)
        if len(responses) != n:
            raise ValueError(f"{n} prompts but {len(responses)} responses")
        lengths = [len(p or "") + len(r or "") for p, r in zip(prompts, responses)]
        shards = plan_shards(lengths, self.workers * max(1, self.settings.shards_per_worker))
        work = [_Shard(s, [prompts[i] for i in s], [responses[i] for i in s]) for s in shards]
        written = np.zeros(n, dtype=np.int64)
        done = 0
        for out in self._pool.map_unordered(lambda a, s: getattr(a, method).remote(s, kwargs), work):
            idx = out[0]
            written[idx] += 1
            yield out
            done += len(idx)
            if progress is not None:
                progress(done, n)
        if n and not (written == 1).all():
            bad = int((written != 1).sum())
            raise RuntimeError(f"ray: {bad} of {n} samples came back {sorted(set(written.tolist()))} times, not once")

    def unconditional_loss(self, responses: Sequence[str | None], **kwargs) -> ForwardResult:
        """``ifd.unconditional_loss`` on the pool."""
        kwargs.pop("with_embeddings", None)
        return self.score_samples([""] * len(responses), list(responses), with_embeddings=False, **kwargs)

    @property
    def pids(self) -> list[int]:
        """The workers' process ids when they started (for logs and tests)."""
        return list(self._pids)

    def close(self) -> None:
        _kill(self._actors)
        self._actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# generation


class _GenWorker:
    """One local generation backend (the body of a Ray actor)."""

    def __init__(self, backend_kwargs: dict, fault_once_file: str | None):
        from middo_pipeline.core.llm.local import LocalBackend

        self.backend = LocalBackend(**backend_kwargs)
        self.fault_once_file = fault_once_file

    def n_params(self) -> int:
        return sum(p.numel() for p in self.backend.loaded.model.parameters())

    def backend_id(self) -> str:
        self.backend.loaded  # noqa: B018 - loaded, the id names the model's folder, as in one process
        return self.backend.backend_id

    def complete(self, index: np.ndarray, requests: list) -> tuple[np.ndarray, list]:
        _crash_once(self.fault_once_file)
        return index, self.backend.complete(requests)


class RayGeneration:
    """An ``LLMBackend`` that runs the local backend (``core.llm.local.LocalBackend``, built
    from ``backend_kwargs``) on a pool of Ray workers: requests sharded by prompt length, each
    worker batching its shard as one process would. Its ``backend_id`` is the local backend's,
    so the completion cache is shared with the one-process path. Wrap it in ``CachedBackend``
    as any backend; ``on_result`` is called in the calling thread as each shard comes back."""

    def __init__(self, backend_kwargs: dict, settings: RaySettings | None = None, log=None):
        st = settings or RaySettings()
        kwargs = _worker_threads(backend_kwargs, st)
        self.settings = st
        self._requests = 0
        # the id a loaded local backend has (the model's folder and fingerprint): the completion
        # cache is then shared with the one-process path
        self._actors, ids = _start_pool(
            "RayGeneration", _GenWorker, (kwargs, st.fault_once_file), st, "backend_id", "generation"
        )
        self._id = str(ids[0])
        self._pool = _actor_pool(self._actors)
        self.workers = len(self._actors)
        if log is not None:
            log(f"ray: {self.workers} generation worker(s) for {kwargs.get('model', 'the default model')}")

    @property
    def backend_id(self) -> str:
        return self._id

    @property
    def n_params(self) -> int:
        """The model's parameter count, read on one worker (for ``prompt_style: auto``)."""
        import ray

        return int(ray.get(self._actors[0].n_params.remote()))

    def complete(self, requests, progress=None, on_result=None) -> list:
        requests = list(requests)
        n = len(requests)
        results: list = [None] * n
        if n == 0:
            return results
        lengths = [sum(len(c) for _, c in r.messages) for r in requests]
        shards = plan_shards(lengths, self.workers * max(1, self.settings.shards_per_worker))
        done = 0
        work = [(s, [requests[i] for i in s]) for s in shards]
        for idx, comps in self._pool.map_unordered(lambda a, w: a.complete.remote(w[0], w[1]), work):
            for i, c in zip(idx.tolist(), comps):
                if results[i] is not None:
                    raise RuntimeError(f"ray: request {i} came back twice")
                results[i] = c
                if on_result is not None:
                    on_result(i, c)
            done += len(idx)
            if progress is not None:
                progress(done, n)
        missing = [i for i, c in enumerate(results) if c is None]
        if missing:
            raise RuntimeError(f"ray: {len(missing)} of {n} requests did not come back")
        self._requests += n
        return results

    def stats(self) -> dict:
        return {"ray_workers": self.workers}

    def close(self) -> None:
        _kill(self._actors)
        self._actors = []
