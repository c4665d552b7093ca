"""AdaFlow Keyframe Selection: clips, keyframe candidates and correspondences from the MODEL's DIFT features."""
from __future__ import annotations

import os
import uuid

import torch

import comfy.model_management as mm
from comfy_api.latest import io

from ..core.dift import dift_feature_chunks
from ..core.errors import LongEditError
from ..core.keyframes import AksParams, select_keyframes
from ..core.memory import frames_per_chunk
from ..core.preview import plan_preview
from .comfy_glue import LongVideoType, Progress, check_sd_unet, latent_thumbnails, scratch_dir
from .video_encode import encode_long_video

KeyframesType = io.Custom("LONGEDIT_KEYFRAMES")
FEATURE_BLOCK = ("output", 9)  # entering output block 9 = leaving block 8: 640 channels at the latent grid,
                               # DIFT's up_ft_index=2 (the feature AdaFlow uses)


class _FeaturesReady(Exception):
    """Raised by the feature patch: the rest of the UNet is not needed."""


def make_featurizer(model, context: torch.Tensor, timestep: int):
    """featurize(x0, noise): noise clean latents to `timestep`, run the UNet up to FEATURE_BLOCK, return h."""
    patcher = model.clone()
    captured = {}

    def grab(h, hsp, transformer_options):
        if transformer_options.get("block") == FEATURE_BLOCK:
            captured["h"] = h
            raise _FeaturesReady
        return h, hsp

    patcher.set_model_output_block_patch(grab)
    base = patcher.model
    device = mm.get_torch_device()
    sigma = base.model_sampling.sigma(torch.tensor([float(timestep)]))

    @torch.no_grad()
    def featurize(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x0 = base.process_latent_in(x0).to(device)
        s = sigma.to(device).expand(x0.shape[0])
        x = base.model_sampling.noise_scaling(s, noise.to(device), x0)
        options = dict(patcher.model_options["transformer_options"])
        try:
            base.apply_model(x, s, c_crossattn=context.to(device).expand(x0.shape[0], -1, -1),
                             transformer_options=options)
        except _FeaturesReady:
            return captured.pop("h")
        raise RuntimeError("the UNet never reached the DIFT feature block")

    return patcher, featurize


def _empty_context(model, conditioning) -> torch.Tensor:
    if conditioning:
        return conditioning[0][0][:1].float()
    dim = model.model.model_config.unet_config["context_dim"]
    return torch.zeros(1, 77, dim)  # without a text encoder: zero context (DIFT uses the empty prompt)


class AdaFlowKeyframeSelection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditAdaFlowKeyframeSelection",
            display_name="AdaFlow Keyframe Selection",
            category="LongEdit/adaflow",
            description=(
                "AdaFlow's Adaptive Keyframe Selection: splits the video into clips where its DIFT features "
                "drift from the clip's first frame, picks keyframe candidates in each clip, and precomputes the "
                "token correspondences that carry the keyframe edit to every frame. Look at the preview before "
                "spending GPU time on the edit."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x/SD2.x MODEL of the edit; its UNet gives the DIFT features."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The video latents from Encode Video (LongEdit). Or connect video + vae."),
                LongVideoType.Input("video", optional=True,
                                    tooltip="Instead of 'latent': the video handle, encoded here with 'vae'."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE used with 'video'."),
                io.Conditioning.Input("empty_prompt", optional=True,
                                      tooltip="CLIP Text Encode of an empty prompt, as DIFT uses. Without it a "
                                              "zero context is used."),
                io.Float.Input("tau_mean", default=0.75, min=0.0, max=1.0, step=0.01,
                               tooltip="A new clip starts when the mean best-match similarity to the clip's first "
                                       "frame drops below this. Higher: more, shorter clips."),
                io.Float.Input("tau_region", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="A new clip also starts when any local window's similarity drops below "
                                       "this (something appeared or vanished). Higher: more clips."),
                io.Int.Input("max_clip_length", default=400, min=1, max=100_000,
                             tooltip="Longest clip in frames (AdaFlow uses 400 at 384x672)."),
                io.Int.Input("feature_timestep", default=0, min=0, max=999,
                             tooltip="Diffusion timestep the latents are noised to for DIFT features (AdaFlow: 0, "
                                     "which its tau_mean/tau_region thresholds were set with); low values favour "
                                     "geometric matches between frames."),
                io.Int.Input("ensemble", default=8, min=1, max=32,
                             tooltip="Noise draws averaged per frame (AdaFlow: 8); fewer is faster and noisier, "
                                     "which moves the similarities the clip thresholds compare."),
                io.Int.Input("candidates_per_clip", default=3, min=1, max=16,
                             tooltip="Keyframe candidates spread over each clip; sampling steps rotate among "
                                     "them. Correspondence memory grows with this."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seeds the feature noise and the per-step keyframe rotation."),
            ],
            outputs=[
                KeyframesType.Output(display_name="keyframes",
                                     tooltip="Clips, candidates, per-step keyframes and correspondences."),
                io.Image.Output(display_name="preview",
                                tooltip="One thumbnail per clip above a timeline strip of the clips "
                                        "(white ticks: keyframe candidates)."),
                io.String.Output(display_name="summary", tooltip="Clip ranges and memory in words."),
            ],
        )

    @classmethod
    def execute(cls, model, tau_mean, tau_region, max_clip_length, feature_timestep, ensemble,
                candidates_per_clip, seed, latent=None, video=None, vae=None, empty_prompt=None) -> io.NodeOutput:
        check_sd_unet(model, "AdaFlow Keyframe Selection")
        if latent is not None:
            samples = latent["samples"]
        elif video is not None and vae is not None:
            samples = encode_long_video(video, vae)
        else:
            raise LongEditError("AdaFlow Keyframe Selection got no frames.",
                                "connect 'latent' (from Encode Video) or both 'video' and 'vae'.")
        if samples.ndim != 4:
            raise LongEditError(f"Expected one latent per frame [frames, channels, h, w], got {tuple(samples.shape)}.",
                                "connect the output of Encode Video (LongEdit).")
        params = AksParams(tau_mean=tau_mean, tau_region=tau_region, max_clip_length=max_clip_length,
                           candidates_per_clip=candidates_per_clip, seed=seed)
        patcher, featurize = make_featurizer(model, _empty_context(model, empty_prompt), feature_timestep)
        per_frame = patcher.memory_required([ensemble, *samples.shape[1:]])
        mm.load_models_gpu([patcher], memory_required=per_frame)
        device = mm.get_torch_device()
        chunk = frames_per_chunk(mm.get_free_memory(device), per_frame, 1)
        progress = Progress(samples.shape[0])

        def features():
            for part in dift_feature_chunks(samples, featurize, ensemble, seed, chunk):
                progress.check()
                yield part

        folder = os.path.join(scratch_dir(), f"keyframes_{uuid.uuid4().hex[:12]}")
        plan = select_keyframes(features(), samples, params, folder=folder, device=device,
                                on_frames=progress.update)
        firsts = plan.candidates[:, 0]
        preview = plan_preview(latent_thumbnails(model, samples[firsts]), plan.clip_starts, plan.candidates,
                               plan.frame_count)
        summary = describe(plan)
        return io.NodeOutput(plan, torch.from_numpy(preview).float().div(255.0)[None], summary,
                             ui={"text": [summary]})


def describe(plan) -> str:
    spans = ", ".join(f"{a}-{b - 1}" for a, b in zip(plan.clip_starts[:12], plan.clip_starts[1:13]))
    more = f", ... ({plan.clip_count - 12} more)" if plan.clip_count > 12 else ""
    return (f"{plan.frame_count} frames in {plan.clip_count} clips [{spans}{more}]; "
            f"{plan.per_clip} candidates per clip; {plan.stored_bytes() / 2**20:.1f} MiB of correspondences "
            f"and AAS scores{' on disk' if plan.folder and os.path.isdir(plan.folder) else ''}")
