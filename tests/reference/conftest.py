"""Reference tier: our ComfyUI code paths against independent transcriptions of the authors' published code
(AdaFlow, TokenFlow) built on diffusers components holding the same random weights.

ComfyUI is imported as a library from COMFYUI_PATH (a checkout of ComfyUI 0.3.64 or later). Without it the
tier is skipped with the reason (CI sets COMFYUI_PATH and fails instead). On a machine without CUDA ComfyUI
is told to run on the CPU before any of its modules load.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def _comfy_importable() -> str | None:
    """None when ComfyUI and diffusers import; otherwise why not."""
    if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "comfy" / "model_management.py").exists():
        return ("reference tier: COMFYUI_PATH is unset or is not a ComfyUI checkout "
                "(set it to a ComfyUI 0.3.64 source tree, e.g. the one tests/run.sh's setup installs)")
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args  # before comfy.model_management reads it

    if not torch.cuda.is_available():
        args.cpu = True
    args.disable_xformers = True
    import comfy.model_management  # noqa: F401
    import diffusers  # noqa: F401
    return None


SKIP_REASON = _comfy_importable()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.reference)
            if SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def unet_pair():
    """The reduced SD2.1-base UNet as ComfyUI's model and as diffusers' model, same random weights."""
    from reference.unet_pair import build_unet_pair

    return build_unet_pair(seed=0)


@pytest.fixture(scope="session", autouse=True)
def session_user_directory(tmp_path_factory):
    """ComfyUI's user directory in a folder of this session: the nodes keep finished inversions and keyframe
    plans there (the stage cache) and would load an earlier session's instead of computing what is tested;
    nor should tests write into the checkout."""
    if SKIP_REASON:
        yield
        return
    import folder_paths

    previous = folder_paths.get_user_directory()
    folder_paths.set_user_directory(str(tmp_path_factory.mktemp("comfy_user")))
    yield
    folder_paths.set_user_directory(previous)
