#!/usr/bin/env bash
# Sets up .venv with test tools, then runs lint, type checks, unit and integration tests.
#   scripts/test.sh              everything
#   scripts/test.sh -m "not integration"   fast unit tests only (args go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check orchestrator tests benchmarks
.venv/bin/ruff format --check orchestrator tests benchmarks
.venv/bin/mypy
exec .venv/bin/pytest "$@"
