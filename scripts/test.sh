#!/usr/bin/env bash
# README command 2: set up, then run the test suite (real runtimes, real models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# With the system programs present (sshd, chromium), the tests that use them must run, not skip.
if bash scripts/system-deps.sh; then export EDGEKIT_REQUIRE_SYSTEM_DEPS=1; fi
exec .venv/bin/python -m pytest "$@"
