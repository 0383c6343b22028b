#!/usr/bin/env bash
# Open the Dagster UI on http://127.0.0.1:${PORT:-3000} over the same instance `middo loop` writes to.
# Bound to 127.0.0.1 only. Ctrl-C (or one SIGTERM to this script's process group) stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export DAGSTER_HOME=${DAGSTER_HOME:-$(pwd)/.dagster_home}
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || printf 'telemetry:\n  enabled: false\n' > "$DAGSTER_HOME/dagster.yaml"
exec .venv/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p "${PORT:-3000}"
