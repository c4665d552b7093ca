"""Resume a long edit after a crash: SIGKILL ComfyUI in the middle of a sampling step, restart it, queue the
same graph again. The output must equal an uninterrupted run's, frame for frame (lossless FFV1, CPU), and
only the step that was in flight may run again. After each restart the keyframe plan and the inversion come
from the stage cache (the first run's), not from the model."""
import os
import re
import signal
import sys
import time

import numpy as np

from comfy_harness import execution_error, start_comfy, stop_comfy
from longedit.core.video.sample import write_sample_video
from longedit.core.video.source import open_long_video, read_frames

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the edit graph of the end-to-end tests
from test_adaflow_edit import edit_graph, saved_video  # noqa: E402

STEPS = 4
FROM_CACHE = ("LongEdit: AdaFlow Invert: using the inversion saved by an earlier run",
              "LongEdit: AdaFlow Keyframe Selection: using the keyframe plan saved by an earlier run")


def graph(name: str) -> dict:
    prompt = edit_graph(name, with_keyframes=True, steps=STEPS, sampler_steps=STEPS)
    prompt["9"]["inputs"]["format"] = "mkv (FFV1 lossless)"
    return prompt


def frames_of(path: str) -> np.ndarray:
    return read_frames(open_long_video(path))


def saved_step(folder) -> int:
    """The last completed step (0-based) in the one state file of the run, -1 when none yet."""
    from safetensors import safe_open

    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")] if folder.exists() else []
    if not files:
        return -1
    try:
        with safe_open(str(folder / files[0]), framework="pt") as f:
            return int(f.metadata()["step"])
    except Exception:  # being replaced right now
        return -1


def queue(server, prompt: dict) -> None:
    status, body = server.post("/prompt", {"prompt": prompt})
    assert status == 200, body


def test_sigkill_mid_step_then_restart_resumes_losing_at_most_that_step(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume_base")
    server = start_comfy(base)
    name = "resume10.mkv"
    write_sample_video(str(server.input_dir / name), frames=10, width=112, height=64, fps=8, codec="ffv1",
                       pix_fmt="yuv444p")
    states = base / "user" / "longedit" / "resume"
    try:
        entry = server.run(graph(name))  # the uninterrupted run
        assert execution_error(entry) is None, execution_error(entry)
        reference = frames_of(saved_video(server, entry))
        assert saved_step(states) == STEPS - 1
        log = server.log.read_text()
        assert not any(message in log for message in FROM_CACHE), log[-3000:]  # computed: nothing cached yet
    finally:
        stop_comfy(server)
    for f in os.listdir(states):  # forget it, so that the next run computes
        os.remove(states / f)

    server = start_comfy(base, restart=True)
    queue(server, graph(name))
    deadline = time.time() + 900
    while saved_step(states) < 1:  # two steps done: the third is in flight
        assert time.time() < deadline and server.process.poll() is None, server.log.read_text()[-3000:]
        time.sleep(0.05)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    killed_at = saved_step(states)
    log = server.log.read_text()
    assert all(message in log for message in FROM_CACHE), log[-3000:]  # the restarted run reused both stages
    assert 1 <= killed_at < STEPS - 1, killed_at

    server = start_comfy(base, restart=True)
    try:
        entry = server.run(graph(name))
        assert execution_error(entry) is None, execution_error(entry)
        log = server.log.read_text()
        resumed = re.findall(r"resuming at step (\d+) of (\d+)", log)
        assert resumed == [(str(killed_at + 2), str(STEPS))], (resumed, killed_at, log[-3000:])
        assert all(message in log for message in FROM_CACHE), log[-3000:]
        assert np.array_equal(frames_of(saved_video(server, entry)), reference)
    finally:
        stop_comfy(server)
