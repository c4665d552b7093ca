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
# The reference tier imports ComfyUI as a library in this interpreter: give it ComfyUI's requirements (torch
# pinned), and a torchvision that imports (PyPI has no CPU build for torch 2.13: its C++ meta-registrations
# are emptied, as tests/tools/setup_comfyui.sh does for ComfyUI's own venv).
if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ] && ! .venv/bin/python -c "import torchvision, torchsde, kornia" 2>/dev/null; then
  work=$(mktemp -d)
  echo "torch==$(.venv/bin/python -c 'from importlib.metadata import version; print(version("torch"))')" > "$work/constraints.txt"
  grep -v -E '^\s*(#|$)' "$COMFYUI_PATH/requirements.txt" | grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' > "$work/comfy.txt"
  $PIP install -q --disable-pip-version-check -c "$work/constraints.txt" -r "$work/comfy.txt" requests torchvision
  if ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
    meta=$(.venv/bin/python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('torchvision').origin), '_meta_registrations.py'))")
    echo "# emptied by LongEdit's tests/run.sh: this torchvision's C++ ops do not load with this torch" > "$meta"
  fi
  .venv/bin/python -m pip uninstall -y -q torchaudio 2>/dev/null || true
  rm -rf "$work"
fi
# The Spread-over-GPUs tests run Ray inside ComfyUI's own interpreter too (its workers load the pack and ComfyUI).
if [ -n "${COMFYUI_VENV:-}" ] && ! "$COMFYUI_VENV/bin/python" -c "import ray" 2>/dev/null; then
  "$COMFYUI_VENV/bin/python" -m pip install -q --disable-pip-version-check "$(grep -E '^ray' requirements-test.txt)"
fi
exec .venv/bin/python -m pytest -ra "$@"
