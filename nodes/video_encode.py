"""Encode Video (LongEdit): stream a long video through an image VAE into one LATENT batch."""
from __future__ import annotations

import torch

from comfy_api.latest import io

from ..core.errors import LongEditError
from ..core.video.source import LongVideo, iter_frames
from .comfy_glue import LongVideoType, Progress, vae_chunk


def check_image_vae(vae, what: str) -> None:
    if getattr(vae, "latent_dim", 2) != 2:
        raise LongEditError(
            f"{what} works frame by frame with an image VAE (SD1.x, SD2.x, SDXL, SD3, Flux); this VAE "
            f"({type(vae.first_stage_model).__name__}) is a video VAE with temporal compression.",
            "use ComfyUI's own VAE Encode / VAE Decode for video VAEs such as Wan's.")


class EncodeLongVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditEncodeVideo",
            display_name="Encode Video (LongEdit)",
            category="LongEdit/video",
            description="Decodes the video chunk by chunk and VAE-encodes each chunk, so only one chunk of "
                        "pixels is ever in memory. Chunk size follows the free memory of the VAE's device.",
            inputs=[
                LongVideoType.Input("video", tooltip="The video handle from Load Video (LongEdit)."),
                io.Vae.Input("vae", tooltip="An image VAE (e.g. from the SD2.1 checkpoint the edit uses)."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="One latent per frame, in frame order.")],
        )

    @classmethod
    def execute(cls, video: LongVideo, vae) -> io.NodeOutput:
        return io.NodeOutput({"samples": encode_long_video(video, vae)})


def encode_long_video(video: LongVideo, vae) -> torch.Tensor:
    """All frames of the handle through the VAE, chunk by chunk, into one preallocated latent batch."""
    check_image_vae(vae, "Encode Video (LongEdit)")
    total, height, width = video.frame_count, video.height, video.width
    chunk = vae_chunk(vae, (1, 3, height, width), encode=True, host_bytes_per_frame=height * width * 15)
    progress = Progress(total)
    samples = None
    done = 0
    for frames in iter_frames(video, chunk):
        progress.check()
        latent = vae.encode(torch.from_numpy(frames).float().div_(255.0))
        if samples is None:  # the VAE decides the latent shape; allocate the whole batch once
            samples = torch.empty((total,) + tuple(latent.shape[1:]), dtype=torch.float32)
        samples[done:done + len(frames)] = latent.to(samples.device, samples.dtype)
        done += len(frames)
        progress.update(done)
    return samples
