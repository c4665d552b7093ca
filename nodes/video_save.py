"""Decode + Save Video and Save Video (LongEdit): stream frames into a file that appears only when complete."""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from comfy.cli_args import args
from comfy_api.latest import io, ui

from ..core.errors import LongEditError
from ..core.video.sink import (FORMAT_LABELS, OUTPUT_FORMATS, AudioFromFile, VideoWriter,
                               read_audio_input)
from ..core.video.source import LongVideo
from .comfy_glue import LongVideoType, Progress, output_target, to_uint8, vae_chunk
from .video_encode import check_image_vae



def _common_inputs() -> list:
    return [
        io.String.Input("filename_prefix", default="LongEdit/video",
                        tooltip="Output name inside ComfyUI's output directory; a counter is appended. Empty: "
                                "'LongEdit'. Folders must be real folders inside output/ (no links out)."),
        io.Combo.Input("format", options=list(FORMAT_LABELS), default=FORMAT_LABELS[0],
                       tooltip="mp4 h264 plays everywhere; h265 is smaller; ProRes and FFV1 are for further "
                               "editing; png sequence writes one PNG per frame into a folder."),
        io.Int.Input("crf", default=19, min=0, max=51,
                     tooltip="h264/h265 quality: lower is better and bigger (17-23 is typical)."),
        io.Float.Input("fps", default=0, min=0, max=240, step=0.001,
                       tooltip="Frame rate of the file. 0: the rate of the connected 'video' (a variable-rate "
                               "source's frames keep their own timestamps; an error if no video is "
                               "connected). Connect Load Video's 'fps' output here for IMAGE frames."),
        LongVideoType.Input("video", optional=True,
                            tooltip="The source video handle: gives the frame rate, the frame count to check, "
                                    "and its audio (copied untouched, trimmed to the selection)."),
        io.Audio.Input("audio", optional=True,
                       tooltip="Audio to put in the file instead of the source video's audio. Up to 7 channels "
                               "keep their layout; more are downmixed to stereo. An AUDIO that cannot be read "
                               "(another pack's silent video) means no audio."),
    ]


def _metadata(hidden) -> dict:
    if args.disable_metadata:
        return {}
    meta = {}
    if hidden.prompt is not None:
        meta["prompt"] = hidden.prompt
    if hidden.extra_pnginfo is not None:
        meta.update(hidden.extra_pnginfo)
    return meta


def _audio_for(video: LongVideo | None, audio):
    if audio is not None:
        return read_audio_input(audio)
    if video is not None and video.source.audio is not None:
        return AudioFromFile(video.source.path, video.start_time, video.end_time)
    return None


def _fps_for(fps: float, video: LongVideo | None):
    if fps > 0:
        return fps
    if video is None:
        raise LongEditError(
            "fps is 0 ('from the connected video') but no video is connected, so the frame rate is unknown; "
            "guessing one would make the video run too fast or too slow against its audio.",
            "connect Load Video's 'fps' output (or its 'video' output) to this node, or type the frame rate.")
    return video.fps


def write_video(frames: Iterator[np.ndarray], total: int, width: int, height: int, *, prefix: str, fmt: str,
                crf: int, fps: float, video: LongVideo | None, audio: dict | None, hidden) -> io.NodeOutput:
    """Stream uint8 chunks into a new output file; show it in the UI and return its path."""
    spec = OUTPUT_FORMATS[fmt]
    rate, sound = _fps_for(fps, video), _audio_for(video, audio)
    # With fps 0 and the handle of a variable-rate source, frames keep their own timestamps (gaps stay gaps).
    times = video.times if fps <= 0 and video is not None and video.frame_count == total else None
    final_path, filename, subfolder = output_target(prefix, spec.extension, width, height)
    progress = Progress(total)
    with VideoWriter(final_path, fmt, rate, width, height, crf=crf, audio=sound,
                     metadata=_metadata(hidden), frame_times=times) as writer:
        for chunk in frames:
            progress.check()
            writer.write(chunk)
            progress.update(writer.frames_written)
        if writer.frames_written != total:
            raise LongEditError(f"Got {writer.frames_written} frames, expected {total}; nothing was saved.",
                                "check the upstream node's output.")
    if spec.extension:
        shown = ui.PreviewVideo([ui.SavedResult(filename, subfolder, io.FolderType.output)])
    else:  # a folder of PNGs: show the first frame
        shown = ui.SavedImages([ui.SavedResult("000001.png", os.path.join(subfolder, filename),
                                               io.FolderType.output)])
    return io.NodeOutput(final_path, ui=shown)


class DecodeSaveLongVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditDecodeSaveVideo",
            display_name="Decode + Save Video (LongEdit)",
            category="LongEdit/video",
            description="VAE-decodes the latents chunk by chunk and encodes each chunk straight into the video "
                        "file, so a 10,000-frame edit never sits in RAM as images. The file is written under a "
                        "temporary name and appears only when complete.",
            inputs=[
                io.Latent.Input("samples", tooltip="One latent per frame, e.g. from KSampler."),
                io.Vae.Input("vae", tooltip="The image VAE the latents were made with."),
                *_common_inputs(),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the video was written.")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, samples, vae, filename_prefix, format, crf, fps, video=None, audio=None) -> io.NodeOutput:
        check_image_vae(vae, "Decode + Save Video (LongEdit)")
        latent = samples["samples"]
        if latent.ndim != 4 or latent.shape[1] != vae.latent_channels:
            raise LongEditError(
                f"These latents ({tuple(latent.shape)}) do not belong to this VAE, which makes "
                f"{vae.latent_channels}-channel image latents.",
                "connect the VAE of the checkpoint that produced the latents (e.g. SD2.1 latents need an SD VAE).")
        total = latent.shape[0]
        if video is not None and total != video.frame_count:
            raise LongEditError(
                f"The latent batch has {total} frames but the connected video selection has {video.frame_count}.",
                "connect the video handle the latents were encoded from, or disconnect 'video' and set fps.")
        h, w = latent.shape[2], latent.shape[3]
        ratio = vae.spacial_compression_decode() if hasattr(vae, "spacial_compression_decode") else 8
        chunk = vae_chunk(vae, (1, latent.shape[1], h, w), encode=False,
                          host_bytes_per_frame=h * w * ratio * ratio * 15)

        def frames() -> Iterator[np.ndarray]:
            for i in range(0, total, chunk):
                yield to_uint8(vae.decode(latent[i:i + chunk]))

        return write_video(frames(), total, w * ratio, h * ratio, prefix=filename_prefix, fmt=format, crf=crf,
                           fps=fps, video=video, audio=audio, hidden=cls.hidden)


class SaveLongVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditSaveVideo",
            display_name="Save Video (LongEdit)",
            category="LongEdit/video",
            description="Saves IMAGE frames as a video with audio, written under a temporary name and renamed "
                        "only when complete.",
            inputs=[
                io.Image.Input("images", tooltip="The frames to save, in order."),
                *_common_inputs(),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the video was written.")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, filename_prefix, format, crf, fps, video=None, audio=None) -> io.NodeOutput:
        total, height, width = images.shape[0], images.shape[1], images.shape[2]

        def frames() -> Iterator[np.ndarray]:
            for i in range(0, total, 64):
                yield to_uint8(images[i:i + 64])

        return write_video(frames(), total, width, height, prefix=filename_prefix, fmt=format, crf=crf,
                           fps=fps, video=video, audio=audio, hidden=cls.hidden)
