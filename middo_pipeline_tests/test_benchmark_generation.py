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
    # the bound of the default path's own decoding steps: every linear layer at its mean live rows
    bound = out["decode_matmul_bound"]
    tokens = paths["compact_batch_64"]["tokens"]
    assert 1.0 <= bound["mean_live_rows"] <= 6 and bound["rows"] == max(1, round(bound["mean_live_rows"]))
    assert bound["mean_live_rows"] <= tokens
    assert bound["linear_layers"] > 0 and bound["tokens_per_s"] > 0
    assert out["default_fraction_of_decode_matmul_bound"] > 0
    from benchmarks.__main__ import goals, headline, table

    head = headline({"generation": out})
    text = table({"generation": out}, head, goals(head))
    assert f"linear layers alone at {bound['rows']} live rows" in text and "default at" in text


def test_decode_matmul_bound_applies_every_linear_layer_once():
    import torch

    from benchmarks.generation import decode_matmul_bound
    from middo_pipeline.core.llm.local import LocalBackend
    from middo_pipeline.models.loading import TINY_MODEL

    model = LocalBackend(model=TINY_MODEL, device="cpu").loaded.model
    calls: list[tuple] = []
    hooks = [
        m.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        res = decode_matmul_bound(model, 2.6, repeats=2)
    finally:
        for h in hooks:
            h.remove()
    assert res["rows"] == 3 and res["linear_layers"] == len(hooks)
    assert len(calls) == 3 * len(hooks) and all(c[0] == 3 for c in calls)  # warm-up + 2 repeats, 3 rows each
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))  # restored


def test_int8_path_reports_what_it_costs_on_held_out_items():
    """int8 is another model: beside its speed the section measures its held-out loss against fp32."""
    import torch

    from benchmarks.common import ModelCache, Settings
    from benchmarks.generation import run
    from middo_pipeline.models.loading import TINY_MODEL

    settings = Settings.quick(
        model=TINY_MODEL,
        device="cpu",
        gen_requests=4,
        gen_repeats=1,
        gen_batch_sizes=(),
        gen_compact_batch_sizes=(4,),
        gen_int8_batch_sizes=(4,),
        gen_continuous=False,
    )
    models = ModelCache(settings)
    linear = sum(type(m) is torch.nn.Linear for m in models.get().model.modules())
    out = run(settings, models, hardware={"fp32": {"flops": 1e9}})
    assert out["paths"]["int8_batch_4"]["errors"] == 0 and out["paths"]["int8_batch_4"]["tokens"] > 0
    q = out["int8_quality"]
    assert q["items"] == 66 and q["eval_set"] == "eval_heldout.jsonl"
    for name in ("int8", "int8_every_linear"):
        d = q[name]["loss_minus_fp32"]
        assert d["items"] == 66 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
        assert abs(d["mean"] - (q[name]["mean_response_loss"] - q["fp32"]["mean_response_loss"])) < 1e-6
        assert 0.0 <= q[name]["same_choice_as_fp32"] <= 1.0
    # the measured fp32 model is the one the other paths ran, left unquantized
    assert sum(type(m) is torch.nn.Linear for m in models.get().model.modules()) == linear
