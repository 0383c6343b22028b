"""docs/configuration.md is generated (scripts/gen_config_docs.py) and must match the code.

When a test here fails: run ``python scripts/gen_config_docs.py`` and commit docs/configuration.md
(a new ``MIDDO_*`` variable also needs its line in the script's ``ENV_VARS``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gen_config_docs.py"


def _script():
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_env_var_is_described():
    gen = _script()
    assert not gen.env_problems(), "\n".join(gen.env_problems())
    assert "MIDDO_HOME" in gen.env_vars_in_source()


def test_configuration_md_is_current():
    # a process of its own: the script clears MIDDO_* from its environment before importing
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert res.returncode == 0, res.stderr[-4000:]
