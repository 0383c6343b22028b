#!/usr/bin/env bash
# Version drift, found on purpose: install the NEWEST versions pyproject.toml allows (no
# constraints.txt) into ./.venv-latest and run the test suite there. CI runs the pinned set
# (scripts/test.sh); run this one before raising a pin, or weekly.
# Usage: bash scripts/test_latest.sh [pytest args]
# Afterwards `.venv-latest/bin/python -m pip freeze` lists what was tested; if it passed,
# `bash scripts/pin.sh .venv-latest` writes those versions to constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-latest MIDDO_CONSTRAINTS=none bash scripts/setup.sh
.venv-latest/bin/python -m pip list --format=freeze 2>/dev/null \
  | grep -i -E '^(torch|transformers|trl|peft|accelerate|dagster|polars|numpy|scikit-learn|umap-learn|openai)==' \
  | tr '\n' ' '; echo
.venv-latest/bin/python -m pytest -q -p no:cacheprovider "$@"
