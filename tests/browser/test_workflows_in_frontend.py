"""Every shipped workflow (workflows/*.json), in ComfyUI's own frontend in headless Chromium.

For each file: drop it on the canvas; no missing-nodes dialog, every node type registered in LiteGraph, no
error dialog, validation toast, broken node or link, unconnected required input or out-of-range widget, and
no uncaught exception; then a screenshot of the fitted graph goes to docs/screenshots/<workflow>.png.

A second test uploads a generated video through the page, sets tiny values on the widgets (12 frames of
64x112, 2 steps; random-weight files stand in for the models the workflow names), presses Run, and waits
for the server to report the prompt finished, then checks the files it shows. Where a model has no
stand-in on this machine, that test is skipped and the reason names the files.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest

from comfy_harness import CKPT, REPO, execution_error
from longedit.core.video.sample import write_sample_video
from longedit.core.video.source import probe_video

WORKFLOWS = Path(os.environ.get("LONGEDIT_WORKFLOWS") or REPO / "workflows")
SCREENSHOTS = REPO / "docs" / "screenshots"
MAX_SCREENSHOT_BYTES = 2_000_000
SCREENSHOT_PADDING = 32  # CSS pixels around the graph

# The tiny run: 12 frames of 64x112 (height x width), 2 steps; a generated video has 4n+1 frames (Wan).
FRAMES, WIDTH, HEIGHT, STEPS = 12, 112, 64, 2
LATENT_VIDEO_LENGTH = 13
SAMPLE_NAME = "longedit_browser_sample.mp4"
RUN_TIMEOUT_S = 1800  # the Wan run takes ~4 min on 2 idle CPU cores, ~14 min beside another Wan run
UMT5_STAND_IN = "random_umt5_xxl_fp8_e4m3fn.safetensors"
# Random-weight files that stand in for the models a workflow names, when this ComfyUI has them:
# (widget, names it stands in for (regex), stand-in, models folder, what writes it).
STAND_INS = [
    ("ckpt_name", r".", CKPT, "checkpoints", "tests/tools/make_random_sd.py, see README 'Tests'"),
    ("unet_name", r"wan", "random_wan21_1.3B.safetensors", "diffusion_models", "tests/tools/make_random_wan.py"),
    ("clip_name", r"umt5", UMT5_STAND_IN, "text_encoders", "tests/tools/make_random_wan_text.py"),
    ("vae_name", r"wan", "random_wan21_vae.safetensors", "vae", "tests/tools/make_random_wan_text.py"),
    ("unet_name", r"liveditor", "random_liveditor_tiny.safetensors", "diffusion_models",
     "tests/tools/make_random_liveditor.py --out <models>/diffusion_models/random_liveditor_tiny.safetensors"),
    ("liveditor_name", r"liveditor", "random_liveditor_tiny.safetensors", "diffusion_models",
     "tests/tools/make_random_liveditor.py --out <models>/diffusion_models/random_liveditor_tiny.safetensors"),
]


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def workflow_params():
    files = workflow_files()
    if not files:
        return [pytest.param(None, id="no-workflows",
                             marks=pytest.mark.skip(reason=f"no workflow files in {WORKFLOWS} (*.json)"))]
    return [pytest.param(path, id=path.stem) for path in files]


def node_types(workflow: dict) -> list[str]:
    """Node types used by a UI-format workflow, subgraph bodies included, without the subgraphs' own ids."""
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    ids = {s.get("id") for s in subgraphs}
    nodes = list(workflow.get("nodes", [])) + [n for s in subgraphs for n in s.get("nodes", [])]
    return [n["type"] for n in nodes if n.get("type") not in ids]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def load_checked(comfy_page, path: Path) -> None:
    """Drop the workflow on the canvas and assert it loaded cleanly. A missing-models dialog is allowed: a
    shared workflow names the user's model files (with download links), which need not be here."""
    workflow = json.loads(path.read_text())
    assert isinstance(workflow.get("nodes"), list) and workflow["nodes"], \
        f"{path.name} is not a UI-format workflow (no 'nodes' list); API-format twins belong in workflows/api/"
    types = node_types(workflow)
    unregistered = sorted(t for t, ok in comfy_page.registered_types(types).items() if not ok)
    problems = [f"node types not registered in LiteGraph (is a node pack missing, or did it fail to "
                f"import? see the server log): {unregistered}"] if unregistered else []

    mark = comfy_page.mark()
    comfy_page.drop_workflow_file(path)
    for text in comfy_page.dialogs():
        if "Missing Models" in text:
            continue
        if "Some Nodes Are Missing" in text:
            problems.append(f"missing-nodes dialog:\n{text}")
        else:
            problems.append(f"dialog:\n{text}")
    for toast in comfy_page.toasts():
        if toast["severity"] in ("error", "warn") or "Links Fixed" in toast["text"]:
            problems.append(f"{toast['severity']} toast: {toast['text']}")
    graph = comfy_page.graph_problems()
    problems += graph["problems"]
    problems += [f"JavaScript error while loading: {e}" for e in comfy_page.new_problems(mark)]
    assert not problems, (f"{path.name} did not load cleanly:\n- " + "\n- ".join(problems) + "\n"
                          + comfy_page.report(*mark)
                          + (f"\nserver log:\n{comfy_page.server_log()}" if unregistered else ""))


@pytest.mark.parametrize("path", workflow_params())
def test_workflow_loads_cleanly_and_is_pictured(comfy_page, path, tmp_path):
    load_checked(comfy_page, path)
    comfy_page.close_dialogs()  # a missing-models notice
    layout = comfy_page.fit_graph()
    boxes = layout["nodes"] + layout["groups"]
    outside = [n for n in boxes if n["left"] < 0 or n["top"] < 0
               or n["right"] > layout["width"] or n["bottom"] > layout["height"]]
    assert not outside, f"{path.name}: nodes outside the view after fitting: {outside} (canvas {layout})"
    overlapping = [(a["id"], a["type"], b["id"], b["type"]) for i, a in enumerate(layout["nodes"])
                   for b in layout["nodes"][i + 1:] if a["left"] < b["right"] and b["left"] < a["right"]
                   and a["top"] < b["bottom"] and b["top"] < a["bottom"]]
    assert not overlapping, f"{path.name}: nodes drawn over each other (id, type): {overlapping}"
    assert not comfy_page.dialogs(), f"a dialog is still open: {comfy_page.dialogs()}"

    # The picture: the fitted graph with a margin, cut from the window (no empty band above and below).
    pad = SCREENSHOT_PADDING
    left = max(0, int(min(n["left"] for n in boxes)) - pad)
    top = max(0, int(min(n["top"] for n in boxes)) - pad)
    right = min(layout["width"], int(max(n["right"] for n in boxes)) + pad + 1)
    bottom = min(layout["height"], int(max(n["bottom"] for n in boxes)) + pad + 1)
    clip = {"x": left, "y": top, "width": right - left, "height": bottom - top}
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{path.stem}.png"
    partial = tmp_path / shot.name
    comfy_page.page.screenshot(path=str(partial), clip=clip)
    assert png_size(partial) == (clip["width"], clip["height"]), (png_size(partial), clip)
    assert partial.stat().st_size <= MAX_SCREENSHOT_BYTES, f"{shot.name}: {partial.stat().st_size} bytes"
    shot.write_bytes(partial.read_bytes())


def tiny_run_plan(nodes: list[dict], sample: str) -> tuple[list[tuple], dict]:
    """The widget changes that make a workflow tiny (see the module's constants), for `ComfyPage.set_widgets`,
    and what they imply: the frames and size its videos should come out with, the stand-ins used."""
    by_type = {
        "LongEditLoadVideo": dict(video=sample, path="", start=0, start_unit="frame", frame_cap=FRAMES,
                                  every_nth=1, force_fps=0, width=WIDTH, height=HEIGHT, image_frame_cap=FRAMES),
        "LoadVideo": dict(file=sample),
        # 12 frames in clips of 4: three clips, so propagation has frames to carry the edit to.
        "LongEditAdaFlowKeyframeSelection": dict(max_clip_length=4, ensemble=1, candidates_per_clip=2),
        "EmptyHunyuanLatentVideo": dict(width=WIDTH, height=HEIGHT, length=LATENT_VIDEO_LENGTH, batch_size=1),
    }
    changes, stand_ins, texts = [], [], []
    for node in nodes:
        widgets = {w["name"]: w for w in node["widgets"]}
        wanted = dict(by_type.get(node["type"], {}))
        for name in ("steps", "inversion_steps"):  # AdaFlow Invert inverts on its own (finer) grid
            if name in widgets:
                wanted[name] = STEPS
        if node["type"] not in by_type and {"width", "height"} <= set(widgets):
            wanted.update(width=WIDTH, height=HEIGHT)
        for name, pattern, stand_in, _, _ in STAND_INS:
            widget = widgets.get(name)
            if widget and re.search(pattern, str(widget["value"]), re.I) and stand_in in (widget["options"] or []):
                wanted[name] = stand_in
                stand_ins.append(stand_in)
        if node["type"] == "CLIPTextEncode" and "text" in widgets:
            texts.append((node, widgets["text"]["value"]))
        changes += [(node["graph"], node["id"], name, value) for name, value in wanted.items()]
    if UMT5_STAND_IN in stand_ins:
        # The random umt5-xxl pads every prompt to 512 tokens, ~3 min on 2 CPU cores: one text for all
        # prompts lets ComfyUI's cache encode once.
        text = next((t for _, t in texts if t), "a video")
        changes += [(node["graph"], node["id"], "text", text) for node, _ in texts]
    types = {n["type"] for n in nodes}
    frames = FRAMES if "LongEditLoadVideo" in types else (
        LATENT_VIDEO_LENGTH if "EmptyHunyuanLatentVideo" in types else None)
    return changes, {"frames": frames, "stand_ins": stand_ins}


def missing_files_reason(name: str, files: list[dict]) -> str:
    parts = []
    for f in files:
        hint = "no random-weight stand-in is known for it"
        for widget, pattern, stand_in, folder, maker in STAND_INS:
            if widget == f["widget"] and re.search(pattern, str(f["value"]), re.I):
                hint = f"its random-weight stand-in models/{folder}/{stand_in} is missing too (write it with {maker})"
        parts.append(f"{f['type']}.{f['widget']} = {f['value']} ({hint})")
    return f"queue step of {name} skipped: files not on this machine: " + "; ".join(parts)


def output_files(server, entry: dict) -> list[Path]:
    files = []
    for node_output in entry.get("outputs", {}).values():
        for items in node_output.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    folder = server.base / item.get("type", "output") / item.get("subfolder", "")
                    files.append(folder / item["filename"])
    return files


@pytest.fixture
def models_freed_after(comfy_ui):
    """After the test, ask the server to drop its loaded models and cached outputs (POST /free), so it
    holds one workflow's models at a time (without this it held ~15 GB of RAM during the Wan run)."""
    yield
    comfy_ui.post("/free", {"unload_models": True, "free_memory": True})


HEAVY = "LONGEDIT_HEAVY_TESTS"


def needs_wan_text_encoder(path) -> bool:
    """A graph that loads Wan's umt5-xxl text encoder (its random stand-in is 5.7 GB and encodes a prompt in
    about 3 minutes on a 2-core CPU)."""
    nodes = json.loads(path.read_text()).get("nodes", [])
    return any(n.get("type") == "CLIPLoader" and "wan" in map(str, n.get("widgets_values", [])) for n in nodes)


@pytest.mark.parametrize("path", workflow_params())
def test_workflow_runs_from_the_page(comfy_page, models_freed_after, path, tmp_path):
    if needs_wan_text_encoder(path) and os.environ.get(HEAVY) != "1":
        pytest.skip(f"{path.name} loads the 5.7 GB random umt5-xxl and runs 4-14 min on a 2-core CPU; set {HEAVY}=1 "
                    "to run it (kept out of the default run so CI stays under 45 minutes)")
    load_checked(comfy_page, path)
    comfy_page.close_dialogs()

    sample = tmp_path / SAMPLE_NAME
    write_sample_video(str(sample), frames=2 * FRAMES, width=WIDTH, height=HEIGHT, fps=8, audio_seconds=3.0,
                       scene_cuts=[FRAMES // 2])
    stored = comfy_page.upload_input(sample.read_bytes(), SAMPLE_NAME)
    assert (comfy_page.server.input_dir / stored).is_file(), f"upload did not reach the input folder: {stored}"
    comfy_page.refresh_node_definitions()

    changes, expect = tiny_run_plan(comfy_page.widget_state(), stored)
    changed = comfy_page.set_widgets(changes)
    graph = comfy_page.graph_problems()
    assert not graph["problems"], "after setting tiny values:\n- " + "\n- ".join(graph["problems"])
    unlisted = [f for f in graph["files"] if f["value"] == stored]
    assert not unlisted, f"the uploaded {stored} is not among the options after refreshing node definitions: {unlisted}"
    if graph["files"]:
        pytest.skip(missing_files_reason(path.name, graph["files"]))

    mark = comfy_page.mark()
    comfy_page.start_watching_executions()
    answer = comfy_page.click_run()
    assert answer["status"] == 200 and not answer.get("node_errors"), (
        f"{path.name}: the server refused the prompt: {json.dumps(answer, indent=1)[:4000]}\n"
        f"tiny values: {changed}\n{comfy_page.report(*mark)}")
    prompt_id = answer["prompt_id"]
    try:
        event = comfy_page.wait_for_execution_end(prompt_id, RUN_TIMEOUT_S)
    except Exception as error:  # a Playwright timeout: say what the server was doing
        raise AssertionError(f"{path.name}: prompt {prompt_id} did not finish in {RUN_TIMEOUT_S} s ({error})\n"
                             f"server log:\n{comfy_page.server_log()}") from error

    entry = comfy_page.server.get(f"/history/{prompt_id}").get(prompt_id)
    assert entry is not None, f"prompt {prompt_id} is not in /history after its {event['type']} event"
    assert entry["status"].get("status_str") == "success" and entry["status"].get("completed"), (
        f"{path.name}: {event['type']}: {execution_error(entry) or entry['status']}\ntiny values: {changed}\n"
        f"server log:\n{comfy_page.server_log()}")
    assert event["type"] == "execution_success", event

    files = output_files(comfy_page.server, entry)
    assert files, f"{path.name}: the run finished but showed no output file: {entry['outputs']}"
    for file in files:
        assert file.is_file() and file.stat().st_size > 0, f"{file} (shown by the run) is not on disk"
        if file.suffix in (".mp4", ".mov", ".mkv"):
            info = probe_video(str(file))
            assert (info.width, info.height) == (WIDTH, HEIGHT), (file, info)
            if expect["frames"] is not None:
                assert info.frame_count == expect["frames"], (file, info, expect)
    assert not comfy_page.dialogs(), f"the frontend shows a dialog after the run: {comfy_page.dialogs()}"
    problems = comfy_page.new_problems(mark)
    assert not problems, f"JavaScript errors during the run: {problems}\n{comfy_page.report(*mark)}"
