#!/usr/bin/env bash
# Sets up a fresh machine and runs the live demo cluster (see README). Extra arguments go
# to `fsha demo`, e.g.: bash scripts/demo.sh --calls 200
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/fsha demo "$@"
