"""What the Comfy Registry and ComfyUI-Manager read from the pack: pyproject.toml, .comfyignore and the node
properties of the shipped workflows. Checked with the publisher's own tool (comfy-cli: `comfy node validate`,
its pyproject parser and its archive builder) and against the frontend's workflow schema (frontend 1.27,
src/platform/workflow/validation/schemas/workflowSchema.ts, transcribed below), so no ComfyUI is needed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from longedit.cli.workflow_format import EXTENSION_WIDGETS, NOTE_TYPES

try:
    from tomllib import loads as toml_loads
except ModuleNotFoundError:  # Python 3.10: tomlkit comes with comfy-cli
    import tomlkit

    def toml_loads(text: str) -> dict:
        return tomlkit.parse(text).unwrap()

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
TESTED_COMFYUI = "0.3.64"  # the ComfyUI the integration tiers run (../shared/vendor tarball in CI)
PYPROJECT = toml_loads((REPO / "pyproject.toml").read_text())

# The frontend's schema for a node's pack properties (workflowSchema.ts): zCnrId, zAuxId, zVersion.
REPO_LIKE_ID = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?$")
GITHUB_USER = re.compile(r"^(?!-)(?!.*--)[a-zA-Z0-9-]+(?<!-)$")
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([\da-z-]+(?:\.[\da-z-]+)*))?"
                    r"(?:\+([\da-z-]+(?:\.[\da-z-]+)*))?$")


def comfy_cli():
    return pytest.importorskip("comfy_cli", reason="comfy-cli is in requirements-test.txt (bash tests/run.sh)")


def repository() -> str:
    return PYPROJECT["project"]["urls"]["Repository"]


# ---- pyproject.toml -----------------------------------------------------------------------------------

def test_comfy_node_validate_passes_without_warnings(tmp_path):
    """The Registry's own check, as a publisher runs it before `comfy node publish`. It exits 0 even when it
    warns (a malformed requires-comfyui or licence is dropped with a warning; exec/eval is flagged), so the
    output must also be free of warnings."""
    comfy_cli()
    comfy = shutil.which("comfy", path=str(Path(sys.executable).parent)) or shutil.which("comfy")
    assert comfy, "the comfy-cli package is installed but its `comfy` command is not on PATH"
    env = {**os.environ, "HOME": str(tmp_path)}  # comfy-cli writes its config there; keep the user's untouched
    result = subprocess.run([comfy, "--skip-prompt", "--no-json", "node", "validate"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed successfully" in output, output
    assert "Warning" not in output and "warnings found" not in output, output


def test_registry_reads_the_urls_icon_and_comfyui_requirement():
    """comfy-cli's parser is what `comfy node publish` uploads: the Registry requires a Repository URL."""
    comfy_cli()
    from comfy_cli.registry.config_parser import extract_node_configuration

    config = extract_node_configuration(str(REPO / "pyproject.toml"))
    urls = config.project.urls
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+)", urls.repository)
    assert owner_repo, f"Repository must be the pack's GitHub URL, not {urls.repository!r}"
    assert urls.issues == urls.repository + "/issues"
    assert urls.documentation.startswith(urls.repository)
    assert config.tool_comfy.icon.startswith("https://") and config.tool_comfy.publisher_id
    assert re.fullmatch(rf"https://raw\.githubusercontent\.com/{owner_repo[1]}/{owner_repo[2]}/.+",
                        config.tool_comfy.icon), "the icon lies in the pack's own repository"
    requirement = config.project.supported_comfyui_version  # "" when comfy-cli could not parse it
    assert requirement, "[tool.comfy] requires-comfyui is missing or malformed"
    # The pack needs V3 nodes (comfy_api.latest, comfy_entrypoint) and claims only what its tests ran on.
    assert TESTED_COMFYUI in SpecifierSet(requirement)
    assert "0.3.63" not in SpecifierSet(requirement)


def test_the_registry_archive_leaves_out_tests_bench_docs_and_keeps_the_pack(tmp_path, monkeypatch):
    """`comfy node pack` builds the archive `comfy node publish` uploads: git-tracked files less .comfyignore."""
    comfy_cli()
    from comfy_cli.file_utils import zip_files

    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-inside-work-tree"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: comfy-cli would archive every file here, which is not what it publishes")
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True,
                             check=True).stdout.split()
    monkeypatch.chdir(REPO)
    archive = tmp_path / "node.zip"
    zip_files(str(archive))
    packed = set(zipfile.ZipFile(archive).namelist())

    development = [f for f in tracked if f.split("/")[0] in ("tests", "bench", "docs", "tools", ".ci")]
    assert development and not packed & set(development), sorted(packed & set(development))[:10]
    runtime = [f for f in tracked if f.split("/")[0] in ("nodes", "core", "kernels", "cli", "workflows")
               or f in ("__init__.py", "__main__.py", "requirements.txt", "pyproject.toml", "LICENSE", "README.md")]
    assert {"__init__.py", "requirements.txt", "pyproject.toml", "LICENSE"} <= set(runtime)
    missing = sorted(set(runtime) - packed)
    assert not missing, f"the archive lacks files the pack needs: {missing}"


# ---- the shipped workflows ----------------------------------------------------------------------------

def expected_properties(node_type: str) -> dict:
    project = PYPROJECT["project"]
    if node_type.startswith("LongEdit"):
        owner_repo = repository().removeprefix("https://github.com/")
        return {"cnr_id": project["name"], "aux_id": owner_repo, "ver": project["version"]}
    return {"cnr_id": "comfy-core", "ver": TESTED_COMFYUI}


def test_workflows_are_shipped():
    assert len(UI_FILES) >= 4 and all((WORKFLOWS / "api" / f.name).exists() for f in UI_FILES)


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_every_node_names_its_pack_as_the_frontend_and_manager_read_it(path):
    """ComfyUI-Manager's "install missing nodes" and the frontend's missing-nodes dialog find a node's pack by
    `cnr_id` (Registry id) or `aux_id` (GitHub owner/repo) and its version by `ver`; core nodes say
    `comfy-core`. Values must also pass the frontend's workflow schema, or loading the file warns."""
    nodes = json.loads(path.read_text())["nodes"]
    assert any(n["type"].startswith("LongEdit") for n in nodes)
    for node in nodes:
        where = f"{path.name} node {node['id']} ({node['type']})"
        properties = node.get("properties", {})
        if node["type"] in NOTE_TYPES:  # frontend-only nodes belong to no pack
            assert not {"cnr_id", "aux_id", "ver"} & set(properties), where
            continue
        pack = {key: properties[key] for key in ("cnr_id", "aux_id", "ver") if key in properties}
        assert pack == expected_properties(node["type"]), where
        assert properties["Node name for S&R"] == node["type"], where
        cnr_id = pack["cnr_id"]
        assert REPO_LIKE_ID.match(cnr_id) and not re.search(r"^[_.-]|[_.-]$", cnr_id) and len(cnr_id) <= 100, where
        if "aux_id" in pack:
            user, _, name = pack["aux_id"].partition("/")
            assert GITHUB_USER.match(user) and len(user) <= 39 and REPO_LIKE_ID.match(name), where
        assert SEMVER.match(pack["ver"].removeprefix("v")), where


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_api_twin_gives_nodes_no_input_the_frontend_invented(path):
    """Frontend extensions add display widgets to some core nodes (PreviewAny's `preview`) that the node
    does not declare; the API twins, sent to /prompt as they are, leave them out."""
    prompt = json.loads((WORKFLOWS / "api" / path.name).read_text())
    ui_types = {str(n["id"]): n["type"] for n in json.loads(path.read_text())["nodes"] if n["type"] not in NOTE_TYPES}
    assert {key: entry["class_type"] for key, entry in prompt.items()} == ui_types
    for node_id, entry in prompt.items():
        invented = set(EXTENSION_WIDGETS.get(entry["class_type"], {})) & set(entry["inputs"])
        assert not invented, f"{path.name} API node {node_id} ({entry['class_type']}) has {sorted(invented)}"
