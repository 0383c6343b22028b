#!/usr/bin/env bash
# Open the Dagster UI on http://127.0.0.1:${PORT:-3000} over the same instance `middo loop` writes to.
# Bound to 127.0.0.1 only. Ctrl-C (or one SIGTERM to this script's process group) stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export DAGSTER_HOME=${DAGSTER_HOME:-$(pwd)/.dagster_home}
# a new DAGSTER_HOME gets the project's instance settings (no telemetry; one queued run per round)
.venv/bin/python -c "from middo_pipeline.loop import ensure_dagster_home; ensure_dagster_home()"
exec .venv/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p "${PORT:-3000}"
