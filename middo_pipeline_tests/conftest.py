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


def write_small_seed(folder: Path) -> Path:
    """The first 40 seed samples, as an Alpaca JSON file of their own in ``folder``."""
    path = folder / "seed_small.json"
    path.write_text(json.dumps(json.loads(SEED_FILE.read_text())[:40]))
    return path


def write_small_eval(folder: Path) -> Path:
    """The first 12 held-out items, as a JSONL file of their own in ``folder``."""
    path = folder / "eval_small.jsonl"
    path.write_text("\n".join(EVAL_FILE.read_text().splitlines()[:12]) + "\n")
    return path


def small_tiny_run(folder: Path) -> tuple[Path, dict]:
    """A small seed file in ``folder`` and the ``tiny`` preset's run config, with a small held-out
    file there too (the evaluation resource's ``heldout_path``: round_evaluation scores on it and
    the gate checks contamination against it): the inputs of a tiny loop that takes seconds per step."""
    from middo_pipeline.loop import load_run_config

    cfg = load_run_config("tiny")
    cfg.setdefault("resources", {})["evaluation"] = {"config": {"heldout_path": str(write_small_eval(folder))}}
    return write_small_seed(folder), cfg


@pytest.fixture
def small_seed(tmp_path) -> Path:
    return write_small_seed(tmp_path)


@pytest.fixture
def small_eval(tmp_path) -> Path:
    return write_small_eval(tmp_path)


@pytest.fixture
def fake():
    """A local OpenAI-compatible HTTP server (``core/fake_openai_server.py``), stopped after the test."""
    from middo_pipeline_tests.core.fake_openai_server import FakeOpenAI

    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run the tiny model a lot: it is faster on one thread, and far steadier
    on a busy 2-core machine (use with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_profile_env(folder: Path, model_cache: Path, **extra: str) -> dict:
    """The environment of a tiny-profile pipeline with its own storage and Dagster home under
    ``folder`` (``extra``: more variables, e.g. an optimizer backend)."""
    return {
        "MIDDO_PROFILE": "tiny",
        "MIDDO_HOME": str(folder / "middo"),
        "MIDDO_DEVICE": "cpu",
        "MIDDO_MODEL_CACHE": str(model_cache),
        "DAGSTER_HOME": str(folder / "dagster_home"),
        **extra,
    }


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
