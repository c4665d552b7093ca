"""The pack imports as ComfyUI imports a custom-node folder, and its layers keep their import rules."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_imports_under_comfyuis_module_name_without_comfyui():
    # ComfyUI names the package after the folder's path with "." replaced by "_x_" and loads __init__.py.
    code = f"""
import importlib.util, inspect, sys
path = {str(REPO)!r}
name = path.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
assert inspect.iscoroutinefunction(module.comfy_entrypoint)
import importlib
core = importlib.import_module(name + ".core.video.source")
importlib.import_module(name + ".core.video.sink")
assert not any(m == "comfy" or m.startswith("comfy.") for m in sys.modules), "core imported ComfyUI"
print("ok", module.__version__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_core_and_kernels_never_import_comfyui():
    comfy_modules = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution"}
    for folder in ("core", "kernels"):
        for path in (REPO / folder).rglob("*.py"):
            for level, name in _imports(path):
                assert not (level == 0 and name.split(".")[0] in comfy_modules), f"{path}: imports {name}"


def test_pack_imports_its_own_modules_relatively():
    own = {"core", "kernels", "nodes"}
    for path in REPO.glob("*/*.py"):
        if path.parts[-2] in ("tests", "bench"):
            continue
        for level, name in _imports(path):
            assert not (level == 0 and name.split(".")[0] in own), f"{path}: absolute import of {name}"
