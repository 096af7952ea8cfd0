#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (lint, then tests).
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -k config
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== tests"
exec .venv/bin/python -m pytest -q "$@"
