"""Test tiers and the pack import.

The pack is imported exactly as ComfyUI imports a custom-node folder: `spec_from_file_location` on the
folder's `__init__.py`, so every import inside the pack must be relative. Unit tests then use it as
`longedit`. Tiers: unit (always), integration (needs COMFYUI_PATH), gpu (needs CUDA).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels are checked in Triton's interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def load_pack(name: str = "longedit"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


load_pack()


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("unit", "integration", "gpu"):
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "gpu" and not cuda:
            item.add_marker(pytest.mark.skip(reason="gpu tier: no CUDA device on this machine"))
