#!/usr/bin/env bash
# Install what the tests need into .venv (CPU torch if none is installed) and run every tier: unit always;
# integration, reference and browser when COMFYUI_PATH points at a ComfyUI checkout (with COMFYUI_VENV; set
# one up with tests/tools/setup_comfyui.sh), else they skip, or fail under CI=true; gpu when CUDA is present.
# Extra arguments go to pytest, e.g. `bash tests/run.sh tests/unit -x`. `bash .ci/run` does the whole setup.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check --upgrade pip
# torch comes with ComfyUI in real use; for the tests any torch >= 2.4 works. 2.13.0 is the CPU wheel here.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q --disable-pip-version-check "torch==${LONGEDIT_TORCH_VERSION:-2.13.0}"
$PIP install -q --disable-pip-version-check -r requirements-test.txt
exec .venv/bin/python -m pytest -ra "$@"
