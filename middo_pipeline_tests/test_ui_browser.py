"""A round driven from the Dagster UI in headless Chromium, as a user would (scripts/ui_browser.py):
schedule on and tested, seed materialized from its page, round-1 added and launched from the
launchpad, its metadata read, quality_signals repaired with another m from its launchpad,
round-2 launched and compared across rounds in the Plots view.

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`; `.ci/run`
installs them when it can) and selenium (the dev extra); skipped, saying which is missing, without.
Screenshots: ui-check/browser/ (kept after the run).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from ui_browser import browser_missing  # noqa: E402

pytestmark = pytest.mark.ui


@pytest.mark.skipif(browser_missing() is not None, reason=f"browser test: {browser_missing()}")
def test_round_from_the_ui(model_cache):
    out = REPO / "ui-check" / "browser"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ui_browser.py"), "--out", str(out)],
        env={**os.environ, "MIDDO_MODEL_CACHE": str(model_cache)},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert proc.returncode == 0, f"{report['failure']} (screenshots in {out})"
    assert report["failure"] is None
    assert len(report["step_seconds"]) == 6, report
    shots = sorted(p.name for p in out.glob("*.png"))
    assert len(shots) >= 6, shots
    assert all((out / s).stat().st_size > 10_000 for s in shots)
