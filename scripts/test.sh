#!/usr/bin/env bash
# Fresh machine -> the test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# pytest exits 5 when it collected no test: that is a failure here too
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
