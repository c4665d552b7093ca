"""A real ComfyUI server with this pack installed, for the integration and browser tests.

Needs COMFYUI_PATH (a ComfyUI checkout) and, for its Python, COMFYUI_VENV (or the current interpreter);
tests/tools/setup_comfyui.sh sets both up. The random-weight SD2.1 checkpoint the graphs load is written
into the checkout's models/checkpoints by tests/tools/make_random_sd.py when missing.
The server runs with `--base-directory` in a temporary folder holding `custom_nodes/longedit` (a link to
this repository, loaded by ComfyUI's own custom-node loader), fresh input/output/temp folders and a link
to the checkout's models, so nothing in the checkout or the repository is modified.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CKPT = "random_sd21.safetensors"


def _comfy_python(comfy: Path) -> str:
    venv = os.environ.get("COMFYUI_VENV")
    return str(Path(venv) / "bin" / "python") if venv else sys.executable


def ensure_checkpoint(comfy: Path, python: str | None = None, arch: str = "sd21") -> Path:
    """models/checkpoints/random_<arch>.safetensors of the checkout, written by tests/tools/make_random_sd.py
    with `python` (any interpreter with torch; default this one) when missing."""
    target = comfy / "models" / "checkpoints" / f"random_{arch}.safetensors"
    if not target.exists():
        subprocess.run([python or sys.executable, str(REPO / "tests" / "tools" / "make_random_sd.py"),
                        "--arch", arch, "--out", str(target)], check=True)
    return target


class ComfyServer:
    def __init__(self, url: str, base: Path, process: subprocess.Popen, log: Path):
        self.url, self.base, self.process, self.log = url, base, process, log
        self.input_dir = base / "input"
        self.output_dir = base / "output"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                data = r.read()
                return r.status, json.loads(data) if data else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 900, interrupt_after: float | None = None) -> dict:
        """Queue an API-format prompt and wait; returns the history entry (status, outputs).

        `interrupt_after`: press Cancel (POST /interrupt) that many seconds after the prompt starts running.
        """
        status, body = self.post("/prompt", {"prompt": prompt})
        if status != 200:
            return {"rejected": body}
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        started = None
        while time.time() < deadline:
            if interrupt_after is not None:
                running = [item[1] for item in self.get("/queue")["queue_running"]]
                if started is None and prompt_id in running:
                    started = time.time()
                if started is not None and time.time() - started >= interrupt_after:
                    self.post("/interrupt", {})
                    interrupt_after = None
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited; log:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


def load_video_node(video: str, **overrides) -> dict:
    """An API-format Load Video (LongEdit) node with every input at its default, except `overrides`."""
    inputs = dict(video=video, start=0, start_unit="frame", frame_cap=0, every_nth=1, force_fps=0, width=0,
                  height=0, resize_mode="crop", size_multiple="8", images="first frame only", image_frame_cap=256)
    inputs.update(overrides)
    return {"class_type": "LongEditLoadVideo", "inputs": inputs}


def execution_error(entry: dict) -> str | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data.get("exception_message", "")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfy(base: Path, restart: bool = False) -> ComfyServer:
    """Start ComfyUI on a free loopback port with `base` as its base directory; skip if not available.
    `restart`: `base` was set up by an earlier start (a restart after a crash: its folders are kept)."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("integration tier: COMFYUI_PATH is not set (a ComfyUI checkout; "
                    "tests/tools/setup_comfyui.sh sets one up; see README 'Tests')")
    comfy_dir = Path(root)
    if not (comfy_dir / "main.py").exists():
        pytest.skip(f"integration tier: COMFYUI_PATH={root} holds no ComfyUI main.py")
    python = _comfy_python(comfy_dir)
    ensure_checkpoint(comfy_dir)
    if not restart:
        (base / "custom_nodes").mkdir()
        (base / "custom_nodes" / "longedit").symlink_to(REPO, target_is_directory=True)
        # stand-ins for other packs' outputs (tests/test_nodes), never shipped with the pack
        (base / "custom_nodes" / "longedit_test_nodes").symlink_to(REPO / "tests" / "test_nodes",
                                                                   target_is_directory=True)
        (base / "models").symlink_to(comfy_dir / "models", target_is_directory=True)
        for sub in ("input", "output", "temp", "user"):
            (base / sub).mkdir()
    port = _free_port()
    log = base / "comfy.log"
    if restart and log.exists():  # keep the earlier process's log beside the new one
        log.rename(base / f"comfy.{int(time.time() * 1000)}.log")
    process = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--disable-auto-launch"],
        cwd=comfy_dir, stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, process, log)
    deadline = time.time() + 300
    while True:
        try:
            server.get("/object_info/CheckpointLoaderSimple")
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError(f"ComfyUI did not start; log:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
    return server


def stop_comfy(server: ComfyServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
