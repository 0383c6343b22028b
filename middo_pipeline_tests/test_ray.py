"""The Ray path: a local Ray cluster on 127.0.0.1 (2 CPUs) with the tiny model.

Checks that the loss and embedding passes on Ray workers give the single-process results
(same ids and order, values within 1e-5), that a worker killed in the middle of a pass is
retried with no row lost or duplicated, and that the Ray path's progress reaches the Dagster
run log. Needs the ``ray`` extra (installed by ``scripts/setup.sh``)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance

from middo_pipeline.core.distributed import RayForward, RaySettings, plan_shards
from middo_pipeline_tests.conftest import SEED_FILE, small_tiny_run, tiny_profile_env

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")


# -- sharding (no cluster) -------------------------------------------------------------------
@pytest.mark.parametrize("n,shards", [(1, 4), (7, 3), (60, 8), (100, 1), (5, 10)])
def test_plan_shards_covers_every_sample_once_in_length_order(n, shards):
    rng = np.random.default_rng(n)
    lengths = rng.integers(1, 500, size=n).tolist()
    parts = plan_shards(lengths, shards)
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(n))  # each index exactly once
    assert 1 <= len(parts) <= min(n, shards)
    ordered = [lengths[i] for i in flat]
    assert ordered == sorted(ordered, reverse=True)  # runs of the length order: even padding per worker


def test_plan_shards_balances_total_length():
    lengths = [100] * 40
    parts = plan_shards(lengths, 4)
    assert [len(p) for p in parts] == [10, 10, 10, 10]
    assert plan_shards([], 4) == []


# -- the core pool against a local cluster ---------------------------------------------------
def _texts(n: int) -> tuple[list[str], list[str]]:
    rows = json.loads(SEED_FILE.read_text())[:n]
    prompts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in rows]
    return prompts, [r["output"] for r in rows]


@pytest.fixture
def local_ray(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_forward_equals_one_process_and_survives_a_killed_worker(local_ray, tiny_model_dir, tmp_path):
    from middo_pipeline.core.forward import EmbeddingSpec, score_samples
    from middo_pipeline.core.ifd import unconditional_loss
    from middo_pipeline.models.loading import load_model

    prompts, responses = _texts(48)
    responses[5] = None  # no response: NaN loss, in both paths
    lm = load_model(str(tiny_model_dir), device="cpu")
    spec = EmbeddingSpec(pooling="last", layer="middle")
    ref = score_samples(lm.model, lm.tokenizer, prompts, responses, max_length=256, embedding=spec)
    ref_u = unconditional_loss(lm.model, lm.tokenizer, responses, max_length=256)

    crash = tmp_path / "crash-once"
    crash.touch()
    seen: list[tuple[int, int]] = []
    settings = RaySettings(workers=2, shards_per_worker=3, fault_once_file=str(crash))
    with RayForward(str(tiny_model_dir), settings, {"device": "cpu"}) as pool:
        first_pids = pool.pids
        out = pool.score_samples(
            prompts, responses, max_length=256, embedding=spec, progress=lambda d, n: seen.append((d, n))
        )
        out_u = pool.unconditional_loss(responses, max_length=256)
        judged: list[tuple[int, int]] = []
        info: dict = {}
        six = pool.expected_scores(
            prompts[:10], responses[:10], max_length=448, progress=lambda d, n: judged.append((d, n)), info=info
        )
        now = ray.get([a.pid.remote() for a in pool._actors])
    assert not crash.exists()  # a worker did crash in the middle of the pass ...
    assert set(now) != set(first_pids)  # ... and Ray restarted it, and re-ran its shard
    np.testing.assert_allclose(out.loss, ref.loss, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(out.embedding, ref.embedding, atol=1e-5)
    np.testing.assert_array_equal(out.n_response_tokens, ref.n_response_tokens)
    np.testing.assert_allclose(out_u.loss, ref_u.loss, atol=1e-5, equal_nan=True)
    assert np.isnan(out.loss[5]) and out.n_tokens == ref.n_tokens
    # the self-judge's six judgements per sample, on the workers, as in one process
    from middo_pipeline.core import quality

    ref_six = quality.expected_scores(lm.model, lm.tokenizer, prompts[:10], responses[:10], max_length=448)
    np.testing.assert_allclose(six, ref_six, atol=1e-5, equal_nan=True)
    assert info["judge_path"] == "packed" and judged[-1] == (60, 60)
    assert seen[-1] == (48, 48) and [d for d, _ in seen] == sorted(d for d, _ in seen)


# -- the pipeline: model_readouts through the ray resource -----------------------------------
@pytest.fixture(scope="module")
def one_round(tmp_path_factory, model_cache):
    from middo_pipeline.loop import run_rounds

    tmp = tmp_path_factory.mktemp("ray-loop")
    env = tiny_profile_env(tmp, model_cache)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        seed, cfg = small_tiny_run(tmp)
        run_rounds(1, seed_path=str(seed), config=cfg, env=env, log=lambda m: None)
        yield env, tmp, mp, cfg


def test_model_readouts_on_ray_equal_one_process(one_round):
    from middo_pipeline.core.storage import Storage
    from middo_pipeline.definitions import build_defs
    from middo_pipeline.rounds import latest_materialization

    env, tmp, mp, cfg = one_round
    store = Storage(env["MIDDO_HOME"])
    path = store.table_path("model_readouts", "round-1")
    single = pl.read_parquet(path)
    cand_path = store.table_path("refinement_candidates", "round-1")
    single_cands = pl.read_parquet(cand_path)
    crash = tmp / "crash-once"
    crash.touch()
    mp.setenv("MIDDO_RAY_FAULT_ONCE_FILE", str(crash))
    ray_env = env | {"MIDDO_RAY_ADDRESS": "local", "MIDDO_RAY_NUM_CPUS": "2", "MIDDO_RAY_WORKERS": "2"}
    defs = build_defs(ray_env)
    with DagsterInstance.get() as instance:
        res = (
            defs.resolve_job_def("middo_round")
            .get_subset(
                asset_selection={AssetKey(k) for k in ("model_readouts", "refined_samples", "refinement_candidates")}
            )
            .execute_in_process(
                instance=instance,
                partition_key="round-1",
                # as the round ran; the optimizer's completions come from the round's cache, and the
                # base model's readouts are computed again (on Ray), not taken from the round's
                run_config={
                    "ops": {
                        "model_readouts": {
                            "config": {**cfg["ops"]["model_readouts"]["config"], "reuse_base_readouts": False}
                        },
                        "refined_samples": cfg["ops"]["refined_samples"],
                    },
                    "resources": cfg["resources"],
                },
            )
        )
        assert res.success
        meta = latest_materialization(instance, "model_readouts", "round-1").asset_materialization.metadata
        logs = [
            e.message
            for e in instance.all_logs(res.run_id)
            if e.message and e.step_key in ("model_readouts", "refined_samples") and not e.is_dagster_event
        ]
    assert not ray.is_initialized()  # the resource disconnected after the step
    assert meta["compute"].value == "ray: 2 workers at local"
    assert meta["base_readouts_reused"].value == 0
    assert not crash.exists()  # a worker crashed mid-pass; the step still succeeded
    on_ray = pl.read_parquet(path)
    assert on_ray["sample_id"].to_list() == single["sample_id"].to_list()
    for col in ("loss_before", "loss_after", "loss_unconditional"):
        np.testing.assert_allclose(on_ray[col].to_numpy(), single[col].to_numpy(), atol=1e-5, equal_nan=True)
    assert on_ray["n_response_tokens"].to_list() == single["n_response_tokens"].to_list()
    np.testing.assert_allclose(
        np.stack(on_ray["embedding"].to_numpy()), np.stack(single["embedding"].to_numpy()), atol=1e-5
    )
    # the candidates were re-scored on Ray too (loss before/after, IFD, nearest-neighbour cosine)
    on_ray_cands = pl.read_parquet(cand_path)
    assert on_ray_cands["origin_id"].to_list() == single_cands["origin_id"].to_list()
    assert on_ray_cands["passed"].to_list() == single_cands["passed"].to_list()
    assert on_ray_cands["output_after"].to_list() == single_cands["output_after"].to_list()
    assert on_ray_cands["response_cached"].to_list() == [True] * on_ray_cands.height, on_ray_cands[
        "response_cached"
    ].to_list()
    for col in ("loss_before", "loss_after", "ifd", "max_cosine"):
        a, b = on_ray_cands[col].cast(pl.Float64).to_numpy(), single_cands[col].cast(pl.Float64).to_numpy()
        np.testing.assert_allclose(a, b, atol=1e-5, equal_nan=True)
    text = "\n".join(logs)
    assert "ray: 2 worker(s) loaded" in text, text
    assert "loss before training (base model)" in text and "loss + embedding after training" in text, text
    # candidates that their text rejects get no forward pass; the others were re-scored on Ray
    # (rescore_candidates on Ray is also compared directly in the test below)
    scored = int(on_ray_cands["loss_after"].is_not_null().sum())
    assert ("candidates: loss + embedding after training" in text) == (scored > 0), (scored, text)


def test_ray_address_is_checked(monkeypatch):
    from middo_pipeline.definitions import resources_from_env

    assert not resources_from_env({})["ray"].enabled
    r = resources_from_env({"MIDDO_RAY_ADDRESS": "ray://head:10001", "MIDDO_RAY_GPUS_PER_WORKER": "1"})["ray"]
    assert r.enabled and r.host == "head" and r.ray_address == "ray://head:10001" and r.num_gpus_per_worker == 1
    with pytest.raises(ValueError, match="MIDDO_RAY_ADDRESS=head"):
        resources_from_env({"MIDDO_RAY_ADDRESS": "head"})
    with pytest.raises(ValueError, match="MIDDO_RAY_WORKERS=two"):
        resources_from_env({"MIDDO_RAY_ADDRESS": "local", "MIDDO_RAY_WORKERS": "two"})


def test_candidates_generated_and_rescored_on_ray_equal_one_process(local_ray, tiny_model_dir, tmp_path):
    from middo_pipeline.core.distributed import RayGeneration
    from middo_pipeline.core.llm.cache import CachedBackend
    from middo_pipeline.core.llm.local import LocalBackend
    from middo_pipeline.core.llm.protocol import ChatRequest

    # generation: the local backend on 2 workers gives the one-process texts (greedy), in order
    reqs = [
        ChatRequest(messages=(("user", f"Say something about item {i}." + " more" * (i % 5)),), max_tokens=12)
        for i in range(10)
    ]
    kwargs = {"model": str(tiny_model_dir), "device": "cpu", "batch_size": 4}
    local = LocalBackend(**kwargs)
    local_texts = [c.text for c in local.complete(reqs)]
    gen = RayGeneration(kwargs, RaySettings(workers=2, shards_per_worker=2))
    delivered: dict[int, str] = {}
    cached = CachedBackend(gen, tmp_path / "completions.sqlite")
    out = cached.complete(reqs, on_result=lambda i, c: delivered.__setitem__(i, c.text))
    gen.close()
    assert gen.backend_id == local.backend_id  # one cache for both paths
    assert [c.text for c in out] == local_texts and all(c.ok for c in out)
    assert delivered == dict(enumerate(local_texts)) and cached.stats()["stored"] == 10
    assert gen.stats() == {"ray_workers": 2}

    from middo_pipeline.core.diversity import TopComponents
    from middo_pipeline.core.forward import EmbeddingSpec
    from middo_pipeline.core.rescore import RescoreSettings, rescore_candidates
    from middo_pipeline.core.verify import QualityScale
    from middo_pipeline.models.loading import load_model

    prompts, responses = _texts(12)
    cands = pl.DataFrame(
        {
            "origin_id": [f"s{i}" for i in range(12)],
            "status": ["ok"] * 11 + ["failed"],
            "instruction_after": prompts,
            "input_after": [""] * 12,
            "output_after": responses,
        }
    )
    lm = load_model(str(tiny_model_dir), device="cpu")
    round_emb = np.random.default_rng(0).normal(size=(6, lm.model.config.hidden_size)).astype(np.float32)
    comps = TopComponents(1).fit(round_emb)
    kw = dict(
        scale=QualityScale.fit("ifd", np.array([4.0, 6.0]), np.array([0.5, 0.9])),
        round_embeddings=comps.transform(round_emb),
        components=comps,
        settings=RescoreSettings(embedding=EmbeddingSpec(pooling="last", layer="middle"), max_length=256),
    )
    local = rescore_candidates(cands, base=lm, checkpoint=lm, **kw)
    opened: list[int] = []

    def pool():
        opened.append(1)
        return RayForward(str(tiny_model_dir), RaySettings(workers=2), {"device": "cpu"})

    on_ray = rescore_candidates(cands, base=pool, checkpoint=pool, **kw)
    assert len(opened) == 2  # base, then the checkpoint: one pool at a time
    assert on_ray["origin_id"].to_list() == local["origin_id"].to_list()
    for col in ("loss_before", "loss_after", "loss_unconditional", "ifd", "quality_value", "max_cosine"):
        np.testing.assert_allclose(
            on_ray[col].cast(pl.Float64).to_numpy(), local[col].cast(pl.Float64).to_numpy(), atol=1e-5, equal_nan=True
        )


def test_more_workers_than_the_cluster_holds_fails_with_the_reason(local_ray, tiny_model_dir):
    settings = RaySettings(workers=3, num_cpus=1, start_timeout_s=5)  # the cluster has 2 CPUs
    with pytest.raises(RuntimeError, match=r"only [0-2] of 3 model workers started within 5s.*the cluster has 2 CPU"):
        RayForward(str(tiny_model_dir), settings, {"device": "cpu"})
