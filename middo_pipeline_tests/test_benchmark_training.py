"""The training benchmark section trains the same steps both ways (LM head at the response
positions, the pipeline's way; at every position, trl's CPU default) and reports them side by
side (on the tiny model: its times mean nothing, its shape and the equality do)."""

from __future__ import annotations


def test_training_section_compares_both_ways_on_the_same_steps():
    from benchmarks.common import Settings
    from benchmarks.training_bench import run
    from middo_pipeline.models.loading import TINY_MODEL

    settings = Settings.quick(model=TINY_MODEL, device="cpu", train_steps=2, train_repeats=1, max_length=128)
    out = run(settings)
    for name in ("every_position", "response_positions"):
        r = out[name]
        assert r["seconds"] > 0 and r["tokens"] > 0 and len(r["losses"]) == 2, name
    assert out["every_position"]["tokens"] == out["response_positions"]["tokens"]  # the same batches
    assert out["speedup"] > 0
    assert out["lora_weights_identical"] is True and out["max_abs_loss_diff"] < 1e-5
