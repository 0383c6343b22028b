"""The UI, for real: `dagster dev` on 127.0.0.1 over a fresh instance after a tiny round.

Runs scripts/ui_check.py (GraphQL checks of lineage, partitions, metadata and asset checks;
Chromium screenshots when Debian's chromium is installed) and fails on any failed check.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ui_check(tmp_path, model_cache):
    env_extra = {"MIDDO_MODEL_CACHE": str(model_cache)}
    import os

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ui_check.py"), "--out", str(tmp_path)],
        env={**os.environ, **env_extra},
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert json.loads((tmp_path / "report.json").read_text())["failures"] == []
    assert "FAIL" not in proc.stdout
    if shutil.which("chromium"):
        for name in ("lineage.png", "round_job_graph.png", "asset_loss_signals.png"):
            assert (tmp_path / name).stat().st_size > 10_000
