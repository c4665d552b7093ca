"""AdaFlow keyframe editing end to end in a real ComfyUI (random-weight SD2.1) through /prompt."""
import pytest

from comfy_harness import CKPT, execution_error, load_video_node
from longedit.core.video.sample import write_sample_video
from longedit.core.video.source import probe_video, read_audio

STEPS = 3


@pytest.fixture(scope="module")
def clip16(comfy) -> str:
    name = "edit16.mp4"
    write_sample_video(str(comfy.input_dir / name), frames=16, width=112, height=64, fps=8, audio_seconds=2.0)
    return name


def edit_graph(clip: str, *, sampler_steps: int = STEPS, with_keyframes: bool = False, kv_budget: int = 20,
               steps: int = STEPS) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": load_video_node(clip),
        "3": {"class_type": "LongEditEncodeVideo", "inputs": {"video": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor painting", "clip": ["1", 1]}},
        "6": {"class_type": "LongEditAdaFlowInvert", "inputs": {
            "model": ["1", 0], "latent": ["3", 0], "source_prompt": ["4", 0], "steps": steps,
            "scheduler": "ddim_uniform", "inversion_steps": steps}},
        "7": {"class_type": "LongEditAdaFlowKeyframeEditing", "inputs": {
            "model": ["1", 0], "inversion": ["6", 1], "pnp_attn_t": 0.8, "pnp_f_t": 0.8, "kv_budget": kv_budget}},
        "8": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["7", 0], "add_noise": "disable", "noise_seed": 0, "steps": sampler_steps, "cfg": 7.5,
            "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": ["5", 0], "negative": ["4", 0],
            "latent_image": ["6", 0], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "9": {"class_type": "LongEditDecodeSaveVideo", "inputs": {
            "samples": ["8", 0], "vae": ["1", 2], "video": ["2", 0], "filename_prefix": "it/edit",
            "format": "mp4 (h264)", "crf": 19, "fps": 0}},
    }
    if with_keyframes:
        prompt["10"] = {"class_type": "LongEditAdaFlowKeyframeSelection", "inputs": dict(
            model=["1", 0], latent=["3", 0], empty_prompt=["4", 0], tau_mean=0.75, tau_region=0.6,
            max_clip_length=4, feature_timestep=50, ensemble=1, candidates_per_clip=2, seed=0)}
        prompt["7"]["inputs"]["keyframes"] = ["10", 0]
    return prompt


def saved_video(comfy, entry) -> str:
    shown = entry["outputs"]["9"]["images"][0]
    return str(comfy.output_dir / shown["subfolder"] / shown["filename"])


def test_short_clip_edit_end_to_end(comfy, clip16):
    entry = comfy.run(edit_graph(clip16))
    assert execution_error(entry) is None, execution_error(entry)
    info = probe_video(saved_video(comfy, entry))
    assert info.frame_count == 16 and (info.width, info.height) == (112, 64) and info.audio is not None


def test_edit_with_keyframes_and_aas(comfy, clip16):
    # max_clip_length=4 gives 4 clips, kv_budget=2 < 4 keyframes: AAS slims the extended attention.
    entry = comfy.run(edit_graph(clip16, with_keyframes=True, kv_budget=2))
    assert execution_error(entry) is None, execution_error(entry)
    assert probe_video(saved_video(comfy, entry)).frame_count == 16


def test_a_sampler_schedule_that_does_not_match_the_inversion_is_refused(comfy, clip16):
    message = execution_error(comfy.run(edit_graph(clip16, sampler_steps=STEPS + 1)))
    assert message and "not in the inversion's schedule" in message and "Fix:" in message


def test_long_clip_with_scene_cuts_propagates_end_to_end(comfy):
    """120 frames, 3 scene cuts: Keyframe Selection -> Invert -> Keyframe Editing -> Latent Propagation ->
    KSamplerAdvanced -> Decode + Save; frame count, order-preserving save and audio survive."""
    name = "long120.mp4"
    write_sample_video(str(comfy.input_dir / name), frames=120, width=112, height=64, fps=24, audio_seconds=5.0,
                       scene_cuts=[30, 60, 90])
    prompt = edit_graph(name, with_keyframes=True, kv_budget=20, steps=2, sampler_steps=2)  # 2 steps: CPU time
    prompt["10"]["inputs"].update(max_clip_length=40, ensemble=1)
    prompt["11"] = {"class_type": "LongEditAdaFlowLatentPropagation",
                    "inputs": {"model": ["7", 0], "keyframes": ["10", 0]}}
    prompt["8"]["inputs"]["model"] = ["11", 0]
    entry = comfy.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    path = saved_video(comfy, entry)
    info = probe_video(path)
    assert info.frame_count == 120 and float(info.fps) == 24 and info.audio is not None
    # the audio is as long as the edited video (5 s): AAC codes 1024-sample frames, so allow two of them
    samples, rate = read_audio(path, 0.0, 10.0)  # a window past the end: all of the file's audio
    assert abs(samples.shape[1] / rate - 120 / 24) <= 2 * 1024 / rate, samples.shape[1] / rate


def test_propagation_without_keyframe_editing_says_what_is_missing(comfy, clip16):
    prompt = edit_graph(clip16, with_keyframes=True)
    prompt["11"] = {"class_type": "LongEditAdaFlowLatentPropagation",
                    "inputs": {"model": ["1", 0], "keyframes": ["10", 0]}}
    prompt["8"]["inputs"]["model"] = ["11", 0]
    message = execution_error(comfy.run(prompt))
    assert message and "needs AdaFlow Keyframe Editing" in message
