"""Test tiers and the pack import.

The pack is imported exactly as ComfyUI imports a custom-node folder: `spec_from_file_location` on the
folder's `__init__.py`, so every import inside the pack must be relative. Unit tests then use it as
`longedit`. Tiers are the folders under tests/ (each test is marked with its folder's name): unit (always),
integration, reference and browser (a ComfyUI at COMFYUI_PATH; browser also Playwright and Chromium), gpu
(CUDA).

Under CI (CI=true), a test of a tier that needs a ComfyUI (NEEDS_COMFYUI) must not skip: a skip there
means something CI should have set up is missing (ComfyUI, a checkpoint, Chromium, Playwright, a package),
so it is reported as a failure with the skip's reason. The exceptions are opt-in runs: a skip whose reason
names an opt-in switch (OPT_IN) stays a skip. The gpu tier skips without CUDA everywhere.
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
TESTS = REPO / "tests"
NEEDS_COMFYUI = ("integration", "reference", "browser")
OPT_IN = ("LONGEDIT_HEAVY_TESTS",)
TIERS = ("unit", "gpu") + NEEDS_COMFYUI


def load_pack(name: str = "longedit"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


load_pack()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def tier_of(path) -> str | None:
    """The tier folder (first folder under tests/) holding `path`, or None outside one."""
    try:
        parts = Path(str(path)).resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        tier = tier_of(item.fspath)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "gpu" and not cuda:
            item.add_marker(pytest.mark.skip(reason="gpu tier: no CUDA device on this machine"))


def skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def must_not_skip(path, report) -> bool:
    """A skip CI turns into a failure: in a tier that needs ComfyUI, not naming an opt-in switch."""
    return (report.skipped and not hasattr(report, "wasxfail") and in_ci() and tier_of(path) in NEEDS_COMFYUI
            and not any(switch in skip_reason(report) for switch in OPT_IN))


def ci_failure(path, report) -> str:
    return (f"CI=true: this {tier_of(path)} test must run in CI, but it skipped: {skip_reason(report)}\n"
            "(CI sets up ComfyUI, the random checkpoints, Chromium and Playwright itself: see .ci/run and "
            "README 'Tests'. Only a skip naming an opt-in switch, " + ", ".join(OPT_IN) + ", is allowed.)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if must_not_skip(item.fspath, report):
        report.longrepr = ci_failure(item.fspath, report)
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (pytest.importorskip or allow_module_level) counts the same."""
    outcome = yield
    report = outcome.get_result()
    if must_not_skip(collector.path, report):
        report.longrepr = ci_failure(collector.path, report)
        report.outcome = "failed"
