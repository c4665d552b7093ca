"""Video graphs run through a real ComfyUI's /prompt: load -> encode (SD2.1 VAE) -> decode + save, and errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from comfy_harness import CKPT, execution_error, load_video_node as load_node
from longedit.core.video.sample import write_sample_video
from longedit.core.video.source import probe_video, read_audio, read_frames, select_frames, Selection

FPS = 24
AAC_FRAME = 1024 / 44100  # audio is copied packet by packet: trims are exact to one AAC frame
INTERRUPT_FRAMES = 3000  # long enough that encoding takes far longer than INTERRUPT_AFTER_S on a CPU
INTERRUPT_AFTER_S = 3.0


def save_inputs(**overrides) -> dict:
    inputs = dict(filename_prefix="it/video", format="mp4 (h264)", crf=19, fps=0)
    inputs.update(overrides)
    return inputs


@pytest.fixture(scope="module")
def clip(comfy) -> str:
    name = "clip_with_audio.mp4"
    write_sample_video(str(comfy.input_dir / name), frames=40, width=120, height=72, fps=FPS, audio_seconds=2.0,
                       scene_cuts=[20])
    return name


def outputs_of(comfy, before: set[Path]) -> list[Path]:
    return sorted(p for p in comfy.output_dir.rglob("*") if p.is_file() and p not in before)


def existing(comfy) -> set[Path]:
    return {p for p in comfy.output_dir.rglob("*") if p.is_file()}


def test_load_encode_decode_save_keeps_count_fps_and_audio(comfy, clip):
    before = existing(comfy)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": load_node(clip, start=0.25, start_unit="second", frame_cap=12, width=112, height=64),
        "3": {"class_type": "LongEditEncodeVideo", "inputs": {"video": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "LongEditDecodeSaveVideo",
              "inputs": {"samples": ["3", 0], "vae": ["1", 2], "video": ["2", 0], **save_inputs()}},
    }
    entry = comfy.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["status"]["status_str"] == "success", entry
    shown = entry["outputs"]["4"]["images"][0]
    written = outputs_of(comfy, before)
    assert [p.name for p in written] == [shown["filename"]], (written, shown)
    assert not [p for p in comfy.output_dir.rglob(".*partial*")], "a partial file was left behind"
    info = probe_video(str(written[0]))
    assert info.frame_count == 12
    assert float(info.fps) == FPS
    assert (info.width, info.height) == (112, 64)
    samples, rate = read_audio(str(written[0]), 0, 10)
    assert abs(samples.shape[1] / rate - 12 / FPS) <= AAC_FRAME + 1e-3


def test_core_video_type_and_image_path(comfy, clip):
    """ComfyUI's own Load Video feeds ours; IMAGE frames go to Save Video (LongEdit) as a PNG sequence."""
    before = existing(comfy)
    prompt = {
        "1": {"class_type": "LoadVideo", "inputs": {"file": clip}},
        "2": {**load_node(clip, frame_cap=6, every_nth=2, images="all selected frames"),
              "inputs": {**load_node(clip, frame_cap=6, every_nth=2, images="all selected frames")["inputs"],
                         "video_in": ["1", 0]}},
        "3": {"class_type": "LongEditSaveVideo",
              "inputs": {"images": ["2", 1], "video": ["2", 0], **save_inputs(format="png sequence")}},
    }
    entry = comfy.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    pngs = [p for p in outputs_of(comfy, before) if p.suffix == ".png"]
    assert len(pngs) == 6
    assert any(p.name == "audio.mka" for p in outputs_of(comfy, before))
    from longedit.core.video.sample import read_index
    import numpy as np
    import av
    indices = []
    for png in sorted(pngs):
        with av.open(str(png)) as c:
            indices.append(read_index(next(c.decode(video=0)).to_ndarray(format="rgb24")))
    assert indices == [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize("overrides, expected", [
    (dict(path="does_not_exist.mp4"), "does not exist"),
    (dict(path="/etc/hostname"), "outside the directories"),
    (dict(start=500), "past the end"),
    (dict(start=1.9, start_unit="second"), "past the end"),
])
def test_bad_selection_fails_clearly_and_writes_nothing(comfy, clip, overrides, expected):
    before = existing(comfy)
    prompt = {
        "2": load_node(clip, **overrides),
        "3": {"class_type": "LongEditSaveVideo", "inputs": {"images": ["2", 1], **save_inputs()}},
    }
    entry = comfy.run(prompt)
    message = execution_error(entry)
    assert message is not None and expected in message, message
    assert "Fix:" in message
    assert outputs_of(comfy, before) == []


def _text_file(path: Path):
    path.write_text("this is not a video\n" * 100)


def _empty_video(path: Path):
    write_sample_video(str(path), frames=0)


def _truncated_video(path: Path):
    write_sample_video(str(path), frames=30, audio_seconds=1.0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("make, expected", [
    (_text_file, "could not be opened as a video"),
    (_empty_video, "zero frames"),
    (_truncated_video, "truncated or corrupt"),
])
def test_unreadable_files_fail_clearly(comfy, make, expected):
    name = f"bad_{make.__name__}.mp4"
    make(comfy.input_dir / name)
    prompt = {"2": load_node(name),
              "3": {"class_type": "LongEditSaveVideo", "inputs": {"images": ["2", 1], **save_inputs()}}}
    message = execution_error(comfy.run(prompt))
    assert message and expected in message and "Fix:" in message, message


def test_latent_count_and_vae_family_mismatch(comfy, clip):
    before = existing(comfy)
    base = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": load_node(clip, frame_cap=4, width=64, height=64),
        "5": load_node(clip, frame_cap=5, width=64, height=64),
        "3": {"class_type": "LongEditEncodeVideo", "inputs": {"video": ["2", 0], "vae": ["1", 2]}},
    }
    count = {**base, "4": {"class_type": "LongEditDecodeSaveVideo",
                           "inputs": {"samples": ["3", 0], "vae": ["1", 2], "video": ["5", 0], **save_inputs()}}}
    message = execution_error(comfy.run(count))
    assert message and "4 frames but the connected video selection has 5" in message
    family = {
        "1": base["1"],
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "4": {"class_type": "LongEditDecodeSaveVideo",
              "inputs": {"samples": ["6", 0], "vae": ["1", 2], **save_inputs()}},
    }
    message = execution_error(comfy.run(family))
    assert message and "do not belong to this VAE" in message
    assert outputs_of(comfy, before) == []


def test_interrupt_stops_the_run_and_leaves_no_file(comfy):
    """Cancel while Encode/Decode stream a long clip: the run ends as interrupted and writes nothing."""
    name = "long_for_interrupt.mp4"
    write_sample_video(str(comfy.input_dir / name), frames=INTERRUPT_FRAMES, width=64, height=64, fps=FPS)
    before = existing(comfy)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": load_node(name),
        "3": {"class_type": "LongEditEncodeVideo", "inputs": {"video": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "LongEditDecodeSaveVideo",
              "inputs": {"samples": ["3", 0], "vae": ["1", 2], "video": ["2", 0], **save_inputs()}},
    }
    entry = comfy.run(prompt, interrupt_after=INTERRUPT_AFTER_S)
    interrupted = [data for kind, data in entry["status"]["messages"] if kind == "execution_interrupted"]
    assert interrupted, entry["status"]["messages"]
    # Cancel landed inside our chunk loop (the checkpoint is cached from earlier tests, loading is quick).
    assert interrupted[0]["node_type"] in ("LongEditEncodeVideo", "LongEditDecodeSaveVideo"), interrupted
    assert "4" not in entry.get("outputs", {})
    assert outputs_of(comfy, before) == []
    assert not [p for p in comfy.output_dir.rglob(".*partial*")]


def test_audio_and_fps_outputs_feed_save_video(comfy, clip):
    """Load Video's AUDIO (trimmed to the selection) and fps outputs drive Save Video (LongEdit) -> mov."""
    before = existing(comfy)
    prompt = {
        "2": load_node(clip, start=8, frame_cap=12, images="all selected frames"),
        "3": {"class_type": "LongEditSaveVideo",
              "inputs": {"images": ["2", 1], "audio": ["2", 2],
                         **save_inputs(format="mov (ProRes 422 HQ)", fps=["2", 3])}},
    }
    entry = comfy.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    [written] = outputs_of(comfy, before)
    info = probe_video(str(written))
    assert info.frame_count == 12 and float(info.fps) == FPS
    samples, rate = read_audio(str(written), 0, 10)
    assert samples.shape[1] == round(12 / FPS * rate)  # PCM in mov: the AUDIO output's exact length
