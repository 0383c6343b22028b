"""The generation benchmark section runs every path on the same requests and reports them side
by side (on the tiny model: its numbers mean nothing, its shape does)."""

from __future__ import annotations


def test_generation_section_compares_the_paths():
    from benchmarks.common import ModelCache, Settings
    from benchmarks.generation import BASELINE, run
    from middo_pipeline.models.loading import TINY_MODEL

    settings = Settings.quick(
        model=TINY_MODEL,
        device="cpu",
        gen_requests=6,
        gen_repeats=1,
        gen_batch_sizes=(3,),
        gen_compact_batch_sizes=(3, 64),
        gen_int8=False,
        gen_continuous=False,
    )
    out = run(settings, ModelCache(settings), hardware={"fp32": {"flops": 1e9}})
    paths = out["paths"]
    assert set(paths) == {BASELINE, "batch_3", "compact_batch_3", "compact_batch_64"}
    for name, p in paths.items():
        assert p["errors"] == 0 and p["tokens"] > 0 and p["tokens_per_s"] > 0, name
        assert 0.0 <= p["agreement_with_baseline"] <= 1.0 and p["fraction_of_bound"] > 0
    assert paths[BASELINE]["speedup"] == 1.0
    # the default engine's greedy texts are generate's (tiny model, fp32: identical here)
    assert paths["compact_batch_3"]["agreement_with_baseline"] == 1.0
    # the default batch (128) holds all 6 requests: measured as the smallest compact batch that does
    assert out["default_path"] == "compact_batch_128" and out["default_path_measured_as"] == "compact_batch_64"
    assert out["speedup_vs_transformers_generate"] == paths["compact_batch_64"]["speedup"] > 0
