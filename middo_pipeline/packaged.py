"""The data files that ship inside the package: the default seed and held-out sets.

The repository keeps them in the top-level ``data/`` folder; pyproject.toml maps that folder to
the subpackage ``middo_pipeline.data``, so a wheel carries them. Every default path to them is
made here, by :func:`data_file`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DATA_PACKAGE = "middo_pipeline.data"
SEED = "seed_alpaca.json"
HELDOUT = "eval_heldout.jsonl"
LARGE_HELDOUT = "eval_large.jsonl"
# what the defaults read; the wheel test checks that each one is in the wheel
DEFAULT_FILES = (SEED, HELDOUT, LARGE_HELDOUT)


def data_dir() -> Path:
    """The folder of the packaged data files.

    Installed (a wheel, or ``pip install -e .``): ``middo_pipeline.data`` through
    ``importlib.resources``. A source checkout used without installing it (only on
    ``PYTHONPATH``) has no such subpackage: the checkout's ``data/`` folder then.
    """
    try:
        return Path(str(resources.files(DATA_PACKAGE)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "data"


def data_file(name: str) -> Path:
    """The path of the packaged data file ``name`` (e.g. :data:`SEED`)."""
    return data_dir() / name
