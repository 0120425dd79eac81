#!/usr/bin/env bash
# README command 2: set up, then run the test suite (real runtimes, real models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
