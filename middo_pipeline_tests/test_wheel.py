"""The wheel carries what the defaults need: a non-editable install finds the seed and held-out files.

Builds the wheel from a copy of the sources (``pip wheel --no-build-isolation``: the venv's
setuptools, no download, nothing written into the checkout) and reads it. Seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from middo_pipeline.packaged import DATA_PACKAGE, DEFAULT_FILES, data_dir, data_file

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "middo_pipeline"
DATA = REPO / "data"

pytestmark = pytest.mark.timeout(300)


def _sources(folder: Path, suffixes: tuple[str, ...]) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A copy of what the wheel is built from (what the tests compare the wheel with, too: the
    working tree may change while they run)."""
    src = tmp_path_factory.mktemp("wheel") / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("middo_pipeline", "data"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    return src


@pytest.fixture(scope="module")
def wheel(src) -> Path:
    """The wheel of the copy (the checkout gets no build/ or egg-info of its own)."""
    out = src.parent / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stdout}\n{res.stderr}"
    (whl,) = out.glob("middo_pipeline-*.whl")
    return whl


@pytest.fixture(scope="module")
def names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_default_data_files_are_in_the_wheel(names):
    where = DATA_PACKAGE.replace(".", "/")
    missing = [f"{where}/{f}" for f in DEFAULT_FILES if f"{where}/{f}" not in names]
    assert not missing, f"not in the wheel: {missing} (pyproject.toml [tool.setuptools.package-data])"


def test_every_data_file_is_in_the_wheel(src, names):
    shipped = {p.name for p in (src / "data").iterdir() if p.is_file()}
    missing = sorted(f for f in shipped if f"middo_pipeline/data/{f}" not in names)
    assert not missing, f"data/ files not in the wheel: {missing} (pyproject.toml package-data for middo_pipeline.data)"


def test_presets_are_in_the_wheel(src, names):
    presets = {f"middo_pipeline/configs/{p.name}" for p in (src / "middo_pipeline" / "configs").glob("*.yaml")}
    assert presets, "no presets found in middo_pipeline/configs"
    assert presets <= names, f"presets not in the wheel: {sorted(presets - names)}"


def test_every_module_is_in_the_wheel(src, names):
    """A new subpackage must be added to pyproject.toml's explicit package list."""
    modules = {f"middo_pipeline/{m}" for m in _sources(src / "middo_pipeline", (".py",))}
    missing = sorted(modules - names)
    assert not missing, (
        f"modules not in the wheel: {missing}; add their package to [tool.setuptools] packages in pyproject.toml"
    )
    assert not any(n.startswith("middo_pipeline_tests/") for n in names), "the tests are not part of the wheel"


def test_helper_paths_exist():
    """Installed (editable here): the helper resolves middo_pipeline.data to the checkout's data/."""
    assert data_dir() == DATA, f"middo_pipeline.data resolves to {data_dir()}; reinstall: bash scripts/setup.sh"
    for name in DEFAULT_FILES:
        assert data_file(name).is_file(), data_file(name)


def test_no_path_into_the_checkout_data_folder():
    """Every default data path goes through middo_pipeline.packaged: none is built from __file__."""
    pattern = re.compile(r"""/\s*["']data["']""")
    found = [
        rel
        for rel in sorted(_sources(PACKAGE, (".py",)))
        if rel != "packaged.py" and pattern.search((PACKAGE / rel).read_text(encoding="utf-8"))
    ]
    assert not found, f"paths to the data/ folder outside middo_pipeline/packaged.py: {found}"


def test_installed_wheel_finds_its_defaults(wheel, tmp_path):
    """The wheel unpacked (what installing a pure wheel does) and imported instead of the checkout:
    every Config default that names a file exists, inside the unpacked package."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    probe = textwrap.dedent(
        f"""
        import importlib, json, pkgutil, sys
        sys.path.insert(0, {str(site)!r})
        import middo_pipeline, middo_pipeline.assets as assets
        from dagster import Config
        from middo_pipeline.packaged import data_dir
        paths = {{}}
        for m in pkgutil.iter_modules(assets.__path__):
            mod = importlib.import_module("middo_pipeline.assets." + m.name)
            for cls in vars(mod).values():
                if isinstance(cls, type) and issubclass(cls, Config) and cls.__module__ == mod.__name__:
                    for name, field in cls.model_fields.items():
                        value = field.get_default(call_default_factory=True)
                        if isinstance(value, str) and value.endswith((".json", ".jsonl", ".parquet")):
                            paths[cls.__name__ + "." + name] = value
        print(json.dumps({{"package": middo_pipeline.__file__, "data": str(data_dir()), "paths": paths}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MIDDO_SEED_PATH"}
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(got["package"]).is_relative_to(site), got["package"]
    assert Path(got["data"]) == site / "middo_pipeline" / "data"
    assert got["paths"], "no Config default names a data file"
    for field, path in got["paths"].items():
        assert Path(path).is_relative_to(site), f"{field} = {path}: outside the installed package"
        assert Path(path).is_file(), f"{field} = {path}: not in the installed package"
