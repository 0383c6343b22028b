#!/usr/bin/env bash
# Fresh machine -> two Middo rounds on the embedded default (SmolLM2-135M-Instruct, CPU, data/seed_alpaca.json).
# Results land in the Dagster instance at ./.dagster_home; open them with `bash scripts/ui.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME=${DAGSTER_HOME:-$(pwd)/.dagster_home}
exec .venv/bin/middo loop --rounds "${ROUNDS:-2}" "$@"
