"""The shipped workflows (workflows/*.json, API twins in workflows/api/) against a real ComfyUI.

They must name only nodes this ComfyUI has, hold valid values in the frontend's widget order, describe the same
graph in both formats, be what tools/build_workflows.py generates, be listed and served as the pack's
templates, and run: the three AdaFlow graphs on the random SD2.1 checkpoint, the Wan graph on a random
Wan2.1-1.3B with a random umt5-xxl (fp8, 5.7 GB) and Wan VAE written by tests/tools when missing (the
LIVEditor graph's run is in test_liveditor.py).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from comfy_harness import CKPT, REPO, _comfy_python, execution_error
from longedit.cli.workflow_format import (NOTE_TYPES, check_api, socket_inputs, ui_to_api, widget_names)
from longedit.cli.workflows import SAMPLE_VIDEO, write_sample
from longedit.core.video.source import probe_video

WORKFLOWS = REPO / "workflows"
NAMES = ["adaflow_keyframe_preview", "adaflow_long_video_edit", "adaflow_short_clip_edit", "isa_wan_video",
         "liveditor_video_edit"]
FRAMES, WIDTH, HEIGHT, STEPS = 12, 112, 64, 2  # tiny: the CPU runs every UNet call of the edit
WAN = "random_wan21_1.3B.safetensors"
UMT5 = "random_umt5_xxl_fp8_e4m3fn.safetensors"
WAN_VAE = "random_wan21_vae.safetensors"
WAN_RAM = 13 * 2**30


def ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def object_info(comfy) -> dict:
    return comfy.get("/object_info")


def test_the_five_workflows_and_their_twins_are_shipped():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == NAMES
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_node_exists_in_this_comfyui(object_info, name):
    types = {n["type"] for n in ui(name)["nodes"]}
    assert types - set(object_info) <= set(NOTE_TYPES), types - set(object_info)  # notes are frontend-only
    assert any(t in NOTE_TYPES for t in types), "each workflow explains itself in a note"
    assert {e["class_type"] for e in api(name).values()} <= set(object_info)


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_is_in_the_frontends_format(object_info, name):
    workflow = ui(name)
    assert list(workflow) == ["id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups",
                              "config", "extra", "version"]
    assert workflow["version"] == 0.4 and workflow["last_node_id"] == max(n["id"] for n in workflow["nodes"])
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    for node in workflow["nodes"]:
        assert list(node)[:9] == ["id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs"]
        assert node["widgets_values"] is not None
        if node["type"] in NOTE_TYPES:
            assert "checkpoint" in node["widgets_values"][0].lower() or "models" in node["widgets_values"][0].lower()
            continue
        info = object_info[node["type"]]
        assert node["properties"]["Node name for S&R"] == node["type"]
        # every widget value in the order the frontend reads them (seeds carry a control_after_generate value)
        assert len(node["widgets_values"]) == len(widget_names(info)), (node["type"], widget_names(info))
        assert [i["name"] for i in node["inputs"]] == [s[0] for s in socket_inputs(info)]
        assert [o["type"] for o in node["outputs"]] == info["output"]
    orders = sorted(n["order"] for n in workflow["nodes"])
    assert orders == list(range(len(workflow["nodes"])))


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_and_api_twin_describe_the_same_graph(object_info, name):
    workflow, prompt = ui(name), api(name)
    nodes = {str(n["id"]): n for n in workflow["nodes"] if n["type"] not in NOTE_TYPES}
    assert {i: n["type"] for i, n in nodes.items()} == {i: e["class_type"] for i, e in prompt.items()}
    api_links = {(i, k, tuple(v)) for i, e in prompt.items() for k, v in e["inputs"].items() if isinstance(v, list)}
    ui_links = set()
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        node = nodes[str(target)]
        assert node["inputs"][target_slot]["link"] == link_id
        ui_links.add((str(target), node["inputs"][target_slot]["name"], (str(origin), slot)))
    assert ui_links == api_links
    for node_id, node in nodes.items():  # widget values by name equal the twin's values
        names = [n for n in widget_names(object_info[node["type"]]) if n not in ("control_after_generate", "upload")]
        values = dict(zip(widget_names(object_info[node["type"]]), node["widgets_values"]))
        assert {n: values[n] for n in names} == {n: v for n, v in prompt[node_id]["inputs"].items() if n in names}
    assert ui_to_api(workflow, object_info) == prompt  # the frontend's Export (API) rules


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_validates_against_object_info(object_info, name):
    assert check_api(api(name), object_info) == []


def test_files_are_what_the_generator_builds_from_this_comfyui(object_info):
    spec = importlib.util.spec_from_file_location("build_workflows", REPO / "tools" / "build_workflows.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    files = build.build_all(object_info)
    assert sorted(files) == sorted(list(WORKFLOWS.glob("*.json")) + list((WORKFLOWS / "api").glob("*.json")))
    stale = [str(p) for p, text in files.items() if p.read_text() != text]
    assert not stale, f"run tools/build_workflows.py: {stale}"


def test_templates_are_listed_and_served(comfy):
    listed = comfy.get("/api/workflow_templates")
    assert sorted(listed["longedit"]) == NAMES  # the key is the custom_nodes folder name; api/ is not listed
    for name in NAMES:
        assert comfy.get(f"/api/workflow_templates/longedit/{name}.json") == ui(name)


# ---- running them ------------------------------------------------------------------------------------------

def set_inputs(prompt: dict, title_or_type: str, **values) -> None:
    matches = [e for e in prompt.values() if title_or_type in (e["_meta"]["title"], e["class_type"])]
    assert matches, title_or_type
    for entry in matches:
        entry["inputs"].update(values)


def tiny_adaflow(name: str) -> dict:
    prompt = copy.deepcopy(api(name))
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=CKPT)
    set_inputs(prompt, "LongEditLoadVideo", frame_cap=FRAMES, width=WIDTH, height=HEIGHT)
    if name != "adaflow_keyframe_preview":
        set_inputs(prompt, "LongEditAdaFlowInvert", steps=STEPS, inversion_steps=STEPS)
        set_inputs(prompt, "KSamplerAdvanced", steps=STEPS)
    if name != "adaflow_short_clip_edit":
        set_inputs(prompt, "LongEditAdaFlowKeyframeSelection", ensemble=1, max_clip_length=FRAMES // 2)
    return prompt


@pytest.fixture(scope="module")
def sample(comfy) -> str:
    """The runner's sample video, under the name the workflows load."""
    write_sample(comfy.input_dir / SAMPLE_VIDEO)
    return SAMPLE_VIDEO


def saved_files(comfy, entry: dict, kind: str = "output") -> list[Path]:
    base = {"output": comfy.output_dir, "temp": comfy.base / "temp"}[kind]
    return [base / item["subfolder"] / item["filename"] for out in entry["outputs"].values()
            for item in out.get("images", []) if item["type"] == kind]


@pytest.mark.parametrize("name", ["adaflow_long_video_edit", "adaflow_short_clip_edit"])
def test_adaflow_edit_workflow_runs(comfy, sample, name):
    entry = comfy.run(tiny_adaflow(name))
    assert "rejected" not in entry, entry
    assert execution_error(entry) is None, execution_error(entry)
    [video] = saved_files(comfy, entry)
    info = probe_video(str(video))
    assert info.frame_count == FRAMES and (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.audio is not None  # the source's audio is kept
    plan = next(v for v in entry["outputs"].values() if any("LongEdit plan" in t for t in v.get("text", [])))
    assert f"{FRAMES} frames" in plan["text"][0]


def test_long_video_workflow_runs_with_isa_on_the_keyframes(comfy, sample):
    """The shipped long-video graph with its AdaFlow Attention Slimming node switched to ISA (the policy widget),
    blocks of 16 tokens so that this tiny latent's attention levels hold several blocks."""
    prompt = tiny_adaflow("adaflow_long_video_edit")
    set_inputs(prompt, "LongEditAdaFlowAttentionSlimming", policy="isa", alpha_s=0.5, block_size=16)
    entry = comfy.run(prompt)
    assert "rejected" not in entry, entry
    assert execution_error(entry) is None, execution_error(entry)
    [video] = saved_files(comfy, entry)
    info = probe_video(str(video))
    assert info.frame_count == FRAMES and (info.width, info.height) == (WIDTH, HEIGHT)


def test_keyframe_preview_workflow_runs(comfy, sample):
    entry = comfy.run(tiny_adaflow("adaflow_keyframe_preview"))
    assert "rejected" not in entry, entry
    assert execution_error(entry) is None, execution_error(entry)
    [preview] = saved_files(comfy, entry, "temp")
    assert preview.is_file() and preview.suffix == ".png"
    texts = [t for v in entry["outputs"].values() for t in v.get("text", [])]
    assert any(t.startswith(f"{FRAMES} frames in ") for t in texts), texts


def ensure_wan_models(comfy_root: Path) -> None:
    python = _comfy_python(comfy_root)
    models = comfy_root / "models"
    if not (models / "diffusion_models" / WAN).exists():
        subprocess.run([python, str(REPO / "tests" / "tools" / "make_random_wan.py"), "--comfy", str(comfy_root)],
                       check=True)
    if not (models / "text_encoders" / UMT5).exists() or not (models / "vae" / WAN_VAE).exists():
        subprocess.run([python, str(REPO / "tests" / "tools" / "make_random_wan_text.py"), "--comfy",
                        str(comfy_root)], check=True)


def available_ram() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def test_isa_wan_workflow_runs(comfy):
    """One latent frame of 16x16 (128x128 px), 2 steps. The umt5-xxl encoder pads every prompt to 512 tokens
    (~3 min on 2 CPU cores), so the negative prompt is given the positive text: ComfyUI's cache then encodes
    once. Loading the 5.7 GB fp8 encoder holds it twice for a moment: the server peaks at ~12 GiB.
    Opt-in (LONGEDIT_HEAVY_TESTS=1): writing the stand-ins and the run take minutes, and CI stays under 45 minutes."""
    if os.environ.get("LONGEDIT_HEAVY_TESTS") != "1":
        pytest.skip("the Wan workflow run writes/loads a 5.7 GB random umt5-xxl and takes minutes on a 2-core CPU; "
                    "set LONGEDIT_HEAVY_TESTS=1 to run it (kept out of the default run so CI stays under 45 minutes)")
    ensure_wan_models(Path(os.environ["COMFYUI_PATH"]))
    comfy.post("/free", {"unload_models": True, "free_memory": True})  # drop the SD2.1 runs' models first
    time.sleep(3)
    if available_ram() < WAN_RAM:
        pytest.skip(f"the Wan graph needs ~{WAN_RAM / 2**30:.0f} GiB of free RAM (random umt5-xxl fp8, 5.7 GB, "
                    f"loaded by ComfyUI's CLIPLoader); {available_ram() / 2**30:.1f} GiB are available")
    prompt = copy.deepcopy(api("isa_wan_video"))
    set_inputs(prompt, "UNETLoader", unet_name=WAN)
    set_inputs(prompt, "CLIPLoader", clip_name=UMT5)
    set_inputs(prompt, "VAELoader", vae_name=WAN_VAE)
    set_inputs(prompt, "EmptyHunyuanLatentVideo", width=128, height=128, length=1)
    set_inputs(prompt, "KSampler", steps=STEPS)
    set_inputs(prompt, "LongEditIsaSparseAttention", block_size=16)
    text = prompt["5"]["inputs"]["text"]
    set_inputs(prompt, "Negative prompt", text=text)
    entry = comfy.run(prompt, timeout=1800)
    assert "rejected" not in entry, entry
    assert execution_error(entry) is None, execution_error(entry)
    [video] = saved_files(comfy, entry)
    info = probe_video(str(video))
    assert info.frame_count == 1 and (info.width, info.height) == (128, 128) and float(info.fps) == 16
