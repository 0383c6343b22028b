"""The code location loads, and reads like the method."""

import pytest
from dagster import AssetKey

from middo_pipeline.definitions import build_defs, resources_from_env

EXPECTED = [
    "seed_dataset",
    "seed_quarantine",
    "round_dataset",
    "sft_checkpoint",
    "model_readouts",
    "loss_signals",
    "embedding_signals",
    "quality_signals",
    "refined_samples",
    "refinement_candidates",
    "optimized_dataset",
    "sample_accounting",
    "round_evaluation",
]


def test_definitions_load():
    defs = build_defs({})
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert set(EXPECTED) <= keys
    assert defs.resolve_job_def("middo_round") is not None and defs.resolve_job_def("seed_job") is not None
    assert defs.resolve_schedule_def("nightly_round") is not None
    graph = repo.asset_graph
    # the round's lineage: seed -> round dataset -> checkpoint -> signals -> refined -> optimized
    assert AssetKey("seed_dataset") in graph.get(AssetKey("round_dataset")).parent_keys
    assert AssetKey("sft_checkpoint") in graph.get(AssetKey("model_readouts")).parent_keys
    assert AssetKey("model_readouts") in graph.get(AssetKey("loss_signals")).parent_keys
    assert {AssetKey("loss_signals"), AssetKey("embedding_signals"), AssetKey("quality_signals")} <= set(
        graph.get(AssetKey("refined_samples")).parent_keys
    )
    assert AssetKey("refined_samples") in graph.get(AssetKey("optimized_dataset")).parent_keys
    # the round's evaluation runs before its merge: it decides whether the round's input is rolled back
    assert AssetKey("round_evaluation") in graph.get(AssetKey("optimized_dataset")).parent_keys
    # ... and before its optimizer: a round that will be rolled back generates nothing
    assert AssetKey("round_evaluation") in graph.get(AssetKey("refined_samples")).parent_keys
    for key in EXPECTED:
        assert graph.get(AssetKey(key)).description, f"{key} has no description"


def test_profiles():
    assert resources_from_env({"MIDDO_PROFILE": "tiny"})["model"].base_model == "tiny-llama"
    res = resources_from_env({"MIDDO_OPTIMIZER_BACKEND": "openai", "MIDDO_OPTIMIZER_BASE_URL": "http://127.0.0.1:9/v1"})
    assert res["optimizer"].backend == "openai" and res["optimizer"].default_style() == "stepwise"
    with pytest.raises(ValueError, match="MIDDO_PROFILE"):
        resources_from_env({"MIDDO_PROFILE": "huge"})


@pytest.mark.parametrize("preset", ["tiny", "gpu"])
def test_presets_are_valid_run_config(preset):
    from dagster import validate_run_config

    from middo_pipeline.loop import load_run_config, split_config

    _, round_cfg = split_config(load_run_config(preset))
    assert round_cfg["ops"], preset
    validate_run_config(build_defs({}).resolve_job_def("middo_round"), round_cfg)


def test_bad_run_config_is_clear(tmp_path):
    from dagster import validate_run_config

    from middo_pipeline.loop import load_run_config, split_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("ops:\n  sft_checkpint: {config: {epochs: 2}}\n")
    with pytest.raises(ValueError, match="sft_checkpint"):
        split_config(load_run_config(str(bad)))
    bad.write_text("resources: {optimizer: {config: {model: x}}}\n")
    with pytest.raises(ValueError, match="MIDDO_"):
        split_config(load_run_config(str(bad)))
    good = tmp_path / "keep.yaml"
    good.write_text("resources: {evaluation: {config: {on_regression: keep}}}\n")
    _, round_cfg = split_config(load_run_config(str(good)))
    assert round_cfg["resources"] == {"evaluation": {"config": {"on_regression": "keep"}}}
    validate_run_config(build_defs({}).resolve_job_def("middo_round"), round_cfg)
    with pytest.raises(FileNotFoundError):
        load_run_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "op, field, bad, allowed",
    [
        ("sft_checkpoint", "init", "last", ("base", "previous")),
        ("quality_signals", "mode", "sample", ("judge", "ifd", "combined")),
        ("quality_signals", "judge_reading", "sample", ("expected", "generate")),
        ("model_readouts", "embedding_pooling", "max", ("mean", "last")),
        ("quality_signals", "judge", "gpt", ("self", "optimizer")),
        ("refined_samples", "prompt_style", "fancy", ("auto", "direct", "stepwise")),
        ("optimized_dataset", "size_policy", "shrink", ("grow", "keep")),
        ("embedding_signals", "knn_method", "fast", ("auto", "exact", "approx")),
    ],
)
def test_bad_choice_fails_at_config_validation_naming_the_choices(op, field, bad, allowed):
    """Choices are declared on the config field: a bad value is refused before any asset runs,
    and the error lists the allowed values."""
    from dagster import DagsterInvalidConfigError, validate_run_config

    job = build_defs({}).resolve_job_def("middo_round")
    for good in allowed:
        validate_run_config(job, {"ops": {op: {"config": {field: good}}}})
    with pytest.raises(DagsterInvalidConfigError) as err:
        validate_run_config(job, {"ops": {op: {"config": {field: bad}}}})
    msg = str(err.value)
    assert f"{op}:config:{field}" in msg and bad in msg
    assert all(repr(a) in msg for a in allowed), msg


def test_bad_optimizer_backend_fails_when_the_resources_are_built():
    with pytest.raises(ValueError, match=r"MIDDO_OPTIMIZER_BACKEND=vllm: unknown backend; use local or openai"):
        resources_from_env({"MIDDO_OPTIMIZER_BACKEND": "vllm"})


def test_optimizer_engine_and_quantize_from_the_environment():
    res = resources_from_env({"MIDDO_OPTIMIZER_ENGINE": "generate", "MIDDO_OPTIMIZER_QUANTIZE": "int8"})
    assert res["optimizer"].engine == "generate" and res["optimizer"].quantize == "int8"
    assert resources_from_env({})["optimizer"].engine == "compact"
    with pytest.raises(ValueError, match=r"MIDDO_OPTIMIZER_ENGINE=vllm: use compact or generate"):
        resources_from_env({"MIDDO_OPTIMIZER_ENGINE": "vllm"})
