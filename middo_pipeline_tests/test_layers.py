"""The layering docs/development.md describes, checked on the source: ``core/`` and ``models/`` are plain
Python (no Dagster, nothing from the Dagster-facing modules), and the shared constants agree
with the modules that cannot import them."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "middo_pipeline"
# what core/ and models/ may import from this package (none of them imports Dagster)
PLAIN = ("middo_pipeline.core", "middo_pipeline.models", "middo_pipeline.constants", "middo_pipeline.atomic")


def _imports(path: Path):
    """Absolute module names imported anywhere in a file (also inside functions)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("layer", ["core", "models"])
def test_no_dagster_in_the_plain_layers(layer):
    files = sorted((PKG / layer).rglob("*.py"))
    assert files
    bad = []
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top.startswith("dagster") or (top == "middo_pipeline" and not name.startswith(PLAIN)):
                bad.append(f"{path.relative_to(PKG)}: import {name}")
    assert not bad, "core/ and models/ must stay free of Dagster:\n" + "\n".join(bad)


def test_plain_helper_modules_import_nothing_of_dagster():
    for name in ("constants.py", "atomic.py"):
        assert not [m for m in _imports(PKG / name) if m.startswith(("dagster", "middo_pipeline"))], name


def test_seed_formats_match_the_reader():
    from middo_pipeline.constants import SEED_FORMATS
    from middo_pipeline.core.ingest import FORMATS

    assert SEED_FORMATS == FORMATS
