"""The headless runner, `python -m longedit run ...`, as a user runs it: a separate process, real ComfyUI.

In-process runs use ComfyUI's Python (COMFYUI_VENV) with ComfyUI from COMFYUI_PATH and fresh input/output/
temp folders (arguments after `--`), so the checkout is not modified. One run goes to the harness's server.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import pytest

from comfy_harness import CKPT, REPO, _comfy_python
from longedit.core.video.sample import write_sample_video
from longedit.core.video.source import probe_video

FRAMES = 12
TINY = ["--set", f"Load Checkpoint.ckpt_name={CKPT}", "--set", f"2.frame_cap={FRAMES}", "--set", "2.width=112",
        "--set", "2.height=64", "--set", "AdaFlow Invert (DDIM).steps=2",
        "--set", "AdaFlow Invert (DDIM).inversion_steps=2", "--set", "12.steps=2"]
TINY_KEYFRAMES = ["--set", "6.ensemble=1", "--set", f"6.max_clip_length={FRAMES // 2}"]


def comfy_root() -> Path:
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "main.py").exists():
        pytest.skip("integration tier: COMFYUI_PATH is not set (a ComfyUI checkout; see README 'Tests')")
    return Path(root)


def folders(tmp_path: Path) -> list[str]:
    return ["--", "--cpu", "--input-directory", str(tmp_path / "input"), "--output-directory",
            str(tmp_path / "output"), "--temp-directory", str(tmp_path)]


def as_module(tmp_path: Path) -> tuple[list[str], dict]:
    """`python -m longedit` as after `pip install -e`: the package `longedit` importable, here via a link."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    if not (site / "longedit").exists():
        (site / "longedit").symlink_to(REPO, target_is_directory=True)
    return ["-m", "longedit"], {"PYTHONPATH": str(site)}


def longedit(args: list[str], *, python: str | None = None, entry: list[str] | None = None, env: dict | None = None,
             timeout: float = 1500, cwd: Path | None = None) -> subprocess.CompletedProcess:
    python = python or _comfy_python(comfy_root())
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([python, *(entry or [str(REPO / "__main__.py")]), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO.parent)


def outputs(stdout: str) -> list[str]:
    return re.findall(r"^output: (.+)$", stdout, flags=re.M)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("longedit: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_long_video_workflow_runs_in_process(tmp_path):
    comfy_root()
    entry, env = as_module(tmp_path)
    result = longedit(["run", "adaflow_long_video_edit", *TINY, *TINY_KEYFRAMES, "--prompt", "an oil painting",
                       *folders(tmp_path)], entry=entry, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "no --video: using a generated sample" in out and (tmp_path / "input" / "longedit_sample.mp4").is_file()
    assert re.search(rf"AdaFlow Keyframe Editing\): LongEdit plan: {FRAMES} frames, 2 keyframes per step", out), out
    assert re.search(rf"AdaFlow Keyframe Selection\): {FRAMES} frames in 2 clips", out), out
    assert re.search(r"KSampler \(Advanced\)\): \d+/\d+", out), "progress is printed"
    [video] = outputs(out)
    assert Path(video).is_file() and Path(video).parent.parent == tmp_path / "output"
    info = probe_video(video)
    assert info.frame_count == FRAMES and (info.width, info.height) == (112, 64) and info.audio is not None
    with av.open(video) as container:  # the graph that ran is saved in the file, with the runner's changes
        ran, graph = json.loads(container.metadata["prompt"]), json.loads(container.metadata["workflow"])
    assert ran["5"]["inputs"]["text"] == "an oil painting" and ran["2"]["inputs"]["frame_cap"] == FRAMES
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes[5]["widgets_values"] == ["an oil painting"] and nodes[2]["widgets_values"][3] == FRAMES


@pytest.mark.parametrize("args, expected", [
    (["run", "no_such_workflow"], "no workflow file 'no_such_workflow' and no shipped workflow of that name"),
    (["run", "adaflow_long_video_edit", "--set", "frame_cap=3"], "is not NODE.INPUT=VALUE"),
    (["run", "adaflow_long_video_edit", "--set", "Load Vidoe.frame_cap=3"], "no node 'Load Vidoe' in the workflow"),
    (["run", "adaflow_keyframe_preview", "--prompt", "a cat"], "has no text node connected to a sampler"),
    (["run", "isa_wan_video", "--video", str(REPO / "README.md")], "this workflow has no video loader"),
    (["run", "adaflow_long_video_edit", "--video", "/no/such/clip.mp4"], "--video /no/such/clip.mp4: no such file"),
    (["run", "adaflow_keyframe_preview", "--", "--cpu", "--bogus"], "ComfyUI refused the arguments after --: "),
])
def test_bad_arguments_fail_with_one_clear_line(args, expected):
    comfy_root()
    result = longedit(args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in error_line(result)


def test_missing_comfyui_path_is_explained(tmp_path):
    comfy_root()
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    result = subprocess.run([_comfy_python(comfy_root()), str(REPO / "__main__.py"), "run", "adaflow_long_video_edit"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "COMFYUI_PATH is not set" in error_line(result)


def test_unknown_input_is_refused_with_the_node_inputs(tmp_path):
    result = longedit(["run", "adaflow_keyframe_preview", "--set", "2.frames=5", *folders(tmp_path)], timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = error_line(result)
    assert "node 2 (Load Video (LongEdit)) has no input 'frames'" in line and "frame_cap" in line


def test_validation_error_names_node_and_input(tmp_path):
    result = longedit(["run", "adaflow_keyframe_preview", "--set", "6.ensemble=0", *folders(tmp_path)], timeout=600)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    line = error_line(result)
    assert "does not validate" in line and "AdaFlow Keyframe Selection" in line and "ensemble" in line, line


def test_execution_error_names_the_node_and_its_message(tmp_path):
    """--video is linked into ComfyUI's input folder; a file that is not a video fails in Load Video."""
    fake = tmp_path / "not_a_video.mp4"
    fake.write_text("this is not a video\n" * 100)
    result = longedit(["run", "adaflow_keyframe_preview", "--video", str(fake), "--set",
                       f"Load Checkpoint.ckpt_name={CKPT}", *folders(tmp_path)], timeout=600)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    line = error_line(result)
    assert "node 2 (Load Video (LongEdit)) failed:" in line and "could not be opened as a video" in line, line
    assert (tmp_path / "input" / "not_a_video.mp4").is_file()


def test_short_clip_runs_on_a_server_with_an_uploaded_video(comfy, tmp_path):
    clip = tmp_path / "my clip.mp4"
    write_sample_video(str(clip), frames=20, width=112, height=64, fps=12, audio_seconds=2.0, scene_cuts=[10])
    # The shipped checkpoint name is not installed here: the server's validation error comes back as one line.
    result = longedit(["run", "adaflow_short_clip_edit", "--server", comfy.url, "--video", str(clip), *TINY[2:]],
                      timeout=900)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    line = error_line(result)
    assert "does not validate: node 1 (Load Checkpoint)" in line and "v2-1_512-ema-pruned.safetensors" in line, line
    result = longedit(["run", "adaflow_short_clip_edit", "--server", comfy.url, "--video", str(clip), "--prompt",
                       "a pencil sketch", *TINY], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (comfy.input_dir / "my clip.mp4").is_file(), "uploaded into the server's input folder"
    assert "running node 12 (KSampler (Advanced))" in result.stdout and "LongEdit plan" in result.stdout
    [video] = outputs(result.stdout)
    relative = video.split(" (on the server")[0]
    path = comfy.base / relative
    assert relative.startswith("output/") and path.is_file(), video
    assert probe_video(str(path)).frame_count == FRAMES


def test_server_run_without_websocket_client_polls(comfy):
    """A Python without aiohttp (hidden from the runner here): it polls /history (and generates and uploads
    the sample)."""
    pytest.importorskip("av")
    without_aiohttp = ["-c", "import runpy, sys; sys.modules['aiohttp'] = None; "
                             f"runpy.run_path({str(REPO / '__main__.py')!r}, run_name='__main__')"]
    result = longedit(["run", "adaflow_keyframe_preview", "--server", comfy.url, "--set",
                       f"Load Checkpoint.ckpt_name={CKPT}", "--set", f"2.frame_cap={FRAMES}", "--set", "2.width=112",
                       "--set", "2.height=64", "--set", "6.ensemble=1"], python=sys.executable, entry=without_aiohttp,
                      timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no progress, waiting for the result" in result.stdout
    assert (comfy.input_dir / "longedit_sample.mp4").is_file()
    assert "preview: temp/" in result.stdout and "done (this workflow writes no output file)" in result.stdout
