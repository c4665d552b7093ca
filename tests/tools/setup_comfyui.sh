#!/usr/bin/env bash
# Set up a ComfyUI and its virtual environment for this pack's integration, reference and browser tests,
# OUTSIDE this repository. Idempotent: a second run with the same source and requirements only checks.
#
#   bash tests/tools/setup_comfyui.sh SOURCE [COMFY_DIR] [VENV]
#
# SOURCE     a ComfyUI source: a tarball (.tar.gz/.tgz/.tar, e.g. ComfyUI-0.3.64-<commit>.tar.gz, with or
#            without one top folder), a git URL or git directory (cloned with --depth 1; COMFYUI_REF picks a
#            tag or branch), or a checkout (used in place when COMFY_DIR is not given or is that folder).
# COMFY_DIR  where ComfyUI goes (default: the checkout given as SOURCE, else $COMFYUI_PATH, else ~/ComfyUI)
# VENV       its virtual environment (default: $COMFYUI_VENV, else COMFY_DIR/venv)
#
# torch: kept when the venv already imports one; else, with an NVIDIA GPU (nvidia-smi), PyPI's torch,
# torchvision and torchaudio; without one, torch==$LONGEDIT_TORCH_VERSION (2.13.0) for the CPU (set
# LONGEDIT_TORCH_INDEX, e.g. https://download.pytorch.org/whl/cpu, to take it from that index). Then
# ComfyUI's requirements.txt with torch pinned, `requests` (0.3.64 imports it without listing it), the
# frontend package and this pack's requirements.txt. Where the torchvision wheel does not match a CPU
# torch (PyPI has no CPU torchvision for torch 2.13), its C++ meta-registrations are emptied so
# `import torchvision` works (ComfyUI imports it at start; its C++ ops stay unavailable); a torchaudio that
# cannot load is removed (ComfyUI then skips its audio nodes). Ends by starting ComfyUI once
# (--quick-test-for-ci) and prints the two exports the tests read.
set -euo pipefail

SCRIPT_VERSION=1
REPO=$(cd "$(dirname "$0")/../.." && pwd -P)
PY=${PYTHON:-python3}
TORCH_VERSION=${LONGEDIT_TORCH_VERSION:-2.13.0}

die() { echo "setup_comfyui: $*" >&2; exit 1; }
say() { echo "setup_comfyui: $*"; }
absolute() { realpath -m "$1"; }

SOURCE=${1:-}
[ -n "$SOURCE" ] || die "usage: setup_comfyui.sh SOURCE [COMFY_DIR] [VENV] (SOURCE: a ComfyUI tarball, git URL or checkout)"

is_checkout() { [ -d "$1" ] && [ -f "$1/main.py" ] && [ -f "$1/requirements.txt" ]; }

if [ -n "${2:-}" ]; then
  COMFY_DIR=$2
elif is_checkout "$SOURCE"; then
  COMFY_DIR=$SOURCE
else
  COMFY_DIR=${COMFYUI_PATH:-$HOME/ComfyUI}
fi
COMFY_DIR=$(absolute "$COMFY_DIR")
VENV=$(absolute "${3:-${COMFYUI_VENV:-$COMFY_DIR/venv}}")
for target in "$COMFY_DIR" "$VENV"; do
  case "$target/" in
    "$REPO"/*) die "$target is inside this repository ($REPO); put ComfyUI and its venv outside it" ;;
  esac
done
mkdir -p "$(dirname "$COMFY_DIR")"

# --- 1. the source -------------------------------------------------------------------------------------
unpack_tarball() {  # tarball -> COMFY_DIR, through a temporary sibling so an interrupted run leaves nothing
  local tarball=$1 staging main strip
  main=$(tar -tf "$tarball" | grep -E '^(\./)?([^/]+/)?main\.py$' | awk 'NR == 1') \
    || die "$tarball holds no ComfyUI (no main.py at its top or in one top folder)"
  strip=$(awk -F/ '{print NF - 1}' <<<"${main#./}")
  staging=$(mktemp -d "$(dirname "$COMFY_DIR")/.comfyui-unpack.XXXXXX")
  tar -xf "$tarball" -C "$staging" --strip-components="$strip"
  [ ! -e "$COMFY_DIR" ] || rmdir "$COMFY_DIR" 2>/dev/null || true
  [ ! -e "$COMFY_DIR" ] || { rm -rf "$staging"; die "$COMFY_DIR exists and holds no ComfyUI; remove it or pick another folder"; }
  mv "$staging" "$COMFY_DIR"
}

if is_checkout "$COMFY_DIR"; then
  say "ComfyUI at $COMFY_DIR (already there; not replaced)"
elif [ -f "$SOURCE" ]; then
  say "unpacking $SOURCE into $COMFY_DIR"
  unpack_tarball "$SOURCE"
elif is_checkout "$SOURCE"; then
  say "copying the checkout $SOURCE into $COMFY_DIR"
  mkdir -p "$COMFY_DIR"
  (cd "$SOURCE" && tar --exclude=./.git --exclude=./venv --exclude=./.venv --exclude=./models -cf - .) \
    | tar -xf - -C "$COMFY_DIR"
  mkdir -p "$COMFY_DIR/models"
else  # a git URL or git directory
  say "cloning $SOURCE${COMFYUI_REF:+ at $COMFYUI_REF} into $COMFY_DIR"
  [ ! -e "$COMFY_DIR" ] || rmdir "$COMFY_DIR" 2>/dev/null || true
  git -c advice.detachedHead=false clone -q --depth 1 ${COMFYUI_REF:+--branch "$COMFYUI_REF"} "$SOURCE" "$COMFY_DIR"
fi
is_checkout "$COMFY_DIR" || die "$COMFY_DIR holds no ComfyUI main.py and requirements.txt after fetching $SOURCE"

# --- 2. the environment ------------------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || { say "creating the venv $VENV"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# What decides the environment: if none of it changed since the last successful run, there is nothing to do.
STAMP="$VENV/.longedit-setup"
fingerprint() {
  { echo "script $SCRIPT_VERSION torch $TORCH_VERSION ${LONGEDIT_TORCH_INDEX:-} gpu $(have_gpu && echo yes || echo no)"
    cat "$COMFY_DIR/requirements.txt" "$REPO/requirements.txt"; } | sha256sum | cut -d' ' -f1
}
checks() {  # what the tests need from this venv
  "$VPY" - <<'PY'
import importlib
for name in ("torch", "torchvision", "av", "aiohttp", "requests", "comfyui_frontend_package", "safetensors", "einops"):
    importlib.import_module(name)
PY
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] && checks 2>/dev/null; then
  say "venv $VENV is already set up for $COMFY_DIR (delete $STAMP to redo it)"
  echo "export COMFYUI_PATH=$COMFY_DIR COMFYUI_VENV=$VENV"
  exit 0
fi

PIP=("$VPY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip wheel
if "$VPY" -c "import torch" 2>/dev/null; then
  say "keeping the venv's torch $("$VPY" -c 'from importlib.metadata import version; print(version("torch"))')"
elif have_gpu; then
  say "NVIDIA GPU found: installing PyPI's torch, torchvision, torchaudio"
  "${PIP[@]}" torch torchvision torchaudio
else
  say "no GPU: installing torch==$TORCH_VERSION for the CPU"
  "${PIP[@]}" ${LONGEDIT_TORCH_INDEX:+--index-url "$LONGEDIT_TORCH_INDEX" --extra-index-url https://pypi.org/simple} \
    "torch==$TORCH_VERSION"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "torch==$("$VPY" -c 'from importlib.metadata import version; print(version("torch"))')" > "$WORK/constraints.txt"
grep -v -E '^\s*(#|$)' "$COMFY_DIR/requirements.txt" | grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' \
  > "$WORK/comfy-requirements.txt"
say "installing ComfyUI's requirements, requests and this pack's requirements"
"${PIP[@]}" -c "$WORK/constraints.txt" -r "$WORK/comfy-requirements.txt" requests comfyui-frontend-package \
  -r "$REPO/requirements.txt"

"$VPY" -c "import torchvision" 2>/dev/null || "${PIP[@]}" -c "$WORK/constraints.txt" torchvision
if ! "$VPY" -c "import torchvision" 2>/dev/null; then
  meta=$("$VPY" -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('torchvision').origin), '_meta_registrations.py'))")
  echo "# emptied by LongEdit's tests/tools/setup_comfyui.sh: this torchvision's C++ ops do not load with this torch" > "$meta"
  "$VPY" -c "import torchvision" || die "torchvision does not import even without its meta-registrations"
  say "torchvision's C++ ops do not match this torch: emptied $meta so that it imports"
fi
if ! "$VPY" -c "import torchaudio" 2>/dev/null; then
  "$VPY" -m pip uninstall -y -q torchaudio 2>/dev/null || true
  say "no loadable torchaudio (ComfyUI's audio nodes will report it at start)"
fi
checks

# --- 3. ComfyUI starts -------------------------------------------------------------------------------
say "starting ComfyUI once (--quick-test-for-ci)"
gpu_flag=--cpu
have_gpu && gpu_flag=
mkdir -p "$WORK/base/custom_nodes"
(cd "$COMFY_DIR" && "$VPY" main.py --quick-test-for-ci $gpu_flag --base-directory "$WORK/base" > "$WORK/start.log" 2>&1) \
  || { tail -40 "$WORK/start.log" >&2; die "ComfyUI did not start (log above)"; }
mkdir -p "$COMFY_DIR/models/checkpoints"
fingerprint > "$STAMP"
"$VPY" - <<'PY'
import importlib
for name in ("torch", "torchvision", "av", "transformers", "comfyui_frontend_package"):
    module = importlib.import_module(name)
    print(f"setup_comfyui:   {name:26s} {getattr(module, '__version__', '')}")
PY
say "done"
echo "export COMFYUI_PATH=$COMFY_DIR COMFYUI_VENV=$VENV"
