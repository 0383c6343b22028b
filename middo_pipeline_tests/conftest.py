"""Shared fixtures: a tiny model built once per session, and isolated storage / Dagster homes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEED_FILE = REPO / "data" / "seed_alpaca.json"
EVAL_FILE = REPO / "data" / "eval_heldout.jsonl"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A model cache shared by the session: the tiny model is built here once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache) -> Path:
    from middo_pipeline.models.loading import TINY_MODEL, resolve_model_path

    return Path(resolve_model_path(TINY_MODEL, model_cache))


@pytest.fixture
def small_seed(tmp_path) -> Path:
    """The first 40 seed samples, as an Alpaca JSON file of their own."""
    rows = json.loads(SEED_FILE.read_text())[:40]
    path = tmp_path / "seed_small.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def small_eval(tmp_path) -> Path:
    lines = EVAL_FILE.read_text().splitlines()[:12]
    path = tmp_path / "eval_small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_env(tmp_path, model_cache, monkeypatch) -> dict:
    """Environment for a tiny-profile pipeline with its own storage and Dagster home."""
    env = {
        "MIDDO_PROFILE": "tiny",
        "MIDDO_HOME": str(tmp_path / "middo"),
        "MIDDO_DEVICE": "cpu",
    }
    monkeypatch.setenv("MIDDO_MODEL_CACHE", str(model_cache))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
