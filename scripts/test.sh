#!/usr/bin/env bash
# Sets up .venv with test tools, then runs lint, type checks, the engine-free unit tests under
# Python 3.12 and 3.13 (scripts/test-pythons.sh), then unit and integration tests.
#   scripts/test.sh              everything
#   scripts/test.sh -m "not integration"   fast unit tests only (args go to pytest)
#   ORCH_TEST_PYTHONS=0 scripts/test.sh ...  without the Python 3.12 and 3.13 runs
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check orchestrator tests benchmarks
.venv/bin/ruff format --check orchestrator tests benchmarks
.venv/bin/mypy
if [[ "${ORCH_TEST_PYTHONS:-}" != 0 ]]; then
  scripts/test-pythons.sh -q
fi
exec .venv/bin/pytest "$@"
