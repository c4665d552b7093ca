"""AdaFlow Keyframe Selection in a real ComfyUI on a random-weight SD2.1 checkpoint."""
import pytest

from comfy_harness import CKPT, execution_error, load_video_node
from longedit.core.video.sample import write_sample_video


@pytest.fixture(scope="module")
def cuts_clip(comfy) -> str:
    name = "three_scenes.mp4"
    write_sample_video(str(comfy.input_dir / name), frames=24, width=112, height=64, fps=12, scene_cuts=[8, 16])
    return name


def graph(clip: str, **selection) -> dict:
    params = dict(tau_mean=0.75, tau_region=0.6, max_clip_length=10, feature_timestep=50, ensemble=2,
                  candidates_per_clip=2, seed=0)
    params.update(selection)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": load_video_node(clip),
        "3": {"class_type": "LongEditEncodeVideo", "inputs": {"video": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "LongEditAdaFlowKeyframeSelection",
              "inputs": {"model": ["1", 0], "latent": ["3", 0], "empty_prompt": ["4", 0], **params}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}},
    }


def test_keyframe_selection_runs_and_previews(comfy, cuts_clip):
    entry = comfy.run(graph(cuts_clip))
    assert execution_error(entry) is None, execution_error(entry)
    [preview] = entry["outputs"]["6"]["images"]
    assert preview["filename"].endswith(".png")
    [summary] = entry["outputs"]["5"]["text"]
    assert summary.startswith("24 frames in ")
    # max_clip_length=10 bounds the clips whatever the random-weight features say: at least 3 clips.
    clips = int(summary.split(" in ")[1].split(" clips")[0])
    assert 3 <= clips <= 24


def test_keyframe_selection_from_video_and_vae(comfy, cuts_clip):
    prompt = graph(cuts_clip)
    prompt["5"]["inputs"].pop("latent")
    prompt["5"]["inputs"].update(video=["2", 0], vae=["1", 2])
    entry = comfy.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)


def test_keyframe_selection_without_frames_says_what_to_connect(comfy, cuts_clip):
    prompt = graph(cuts_clip)
    prompt["5"]["inputs"].pop("latent")
    message = execution_error(comfy.run(prompt))
    assert message and "connect 'latent'" in message
