"""AdaFlow Keyframe Selection: clips, keyframe candidates and correspondences from the MODEL's DIFT features."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import uuid

import numpy as np
import torch

import comfy.model_management as mm
from comfy_api.latest import io

from .. import kernels
from ..core.adaflow import dift as dift_module, keyframes as keyframes_module
from ..core.adaflow.dift import dift_feature_chunks
from ..core.errors import LongEditError
from ..core.adaflow.keyframes import AksParams, KeyframePlan, select_keyframes
from ..core.memory import frames_per_chunk
from ..core.scale.pool import dispatch_frames
from ..core.adaflow.preview import plan_preview
from ..core.resume import Fingerprint
from ..core.stage_cache import CachedStage, StageCache, source_digest
from .scale import features_spread, scale_options
from .comfy_glue import (CACHE_LIMIT_BYTES, LongVideoType, Progress, add_model_identity, cache_dir, check_sd_unet,
                         latent_thumbnails, scratch_dir)
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


STAGE = "keyframes"


def plan_key(model, samples: torch.Tensor, context: torch.Tensor, params: AksParams, settings: list, device) -> str:
    """A digest of everything that determines the keyframe plan: the latents, the model, the prompt of the
    features, every setting, the device kind (matching runs in float16 on a GPU) and the code."""
    fp = Fingerprint().add("LongEdit keyframes v1")
    matching = [os.path.join(os.path.dirname(kernels.__file__), name)  # nearest.py needs Triton: read, not imported
                for name in ("nearest.py", "nearest_reference.py")]
    fp.add(source_digest(keyframes_module, dift_module, kernels, *matching, sys.modules[__name__]))
    add_model_identity(fp, model)
    fp.add([samples, context, repr(params), settings, list(FEATURE_BLOCK), torch.device(device).type])
    return fp.hex()


def plan_arrays(plan: KeyframePlan) -> tuple[dict, dict]:
    arrays = {"clip_starts": plan.clip_starts, "candidates": plan.candidates, "aas_scores": plan.aas_scores,
              "fingerprint": plan.fingerprint, **{f"matches_{i}": m for i, m in enumerate(plan.matches)}}
    info = {"frame_count": plan.frame_count, "latent_size": list(plan.latent_size),
            "levels": [list(level) for level in plan.levels], "params": dataclasses.asdict(plan.params)}
    return arrays, info


def plan_from(cached: CachedStage) -> KeyframePlan:
    """The cached plan, its correspondences memory-mapped from the cache file."""
    a, info = cached.arrays, cached.info
    levels = [tuple(level) for level in info["levels"]]
    return KeyframePlan(frame_count=info["frame_count"], latent_size=tuple(info["latent_size"]), levels=levels,
                        clip_starts=np.array(a["clip_starts"]), candidates=np.array(a["candidates"]),
                        matches=[a[f"matches_{i}"] for i in range(len(levels))], aas_scores=a["aas_scores"],
                        fingerprint=np.array(a["fingerprint"]), params=AksParams(**info["params"]))


def cached_or_selected(cache: StageCache, key: str, compute) -> KeyframePlan:
    """The plan saved by an earlier run under `key`, or compute() saved for the next one (large arrays then
    read from the cache file, their scratch copies removed)."""
    cached = cache.load(STAGE, key)
    if cached is not None:
        logging.info("LongEdit: AdaFlow Keyframe Selection: using the keyframe plan saved by an earlier run")
        return plan_from(cached)
    plan = compute()
    arrays, info = plan_arrays(plan)
    path = cache.save(STAGE, key, arrays, info)
    on_disk = any(isinstance(a, np.memmap) for a in arrays.values())
    if path is not None and on_disk and plan.folder is not None:
        saved = cache.load(STAGE, key, verify=False)
        if saved is not None:
            shutil.rmtree(plan.folder, ignore_errors=True)
            return plan_from(saved)
    return plan


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
                "spending GPU time on the edit. The plan is kept under ComfyUI's user directory (longedit/cache): "
                "queued again with the same latents, model and settings, even after a restart, it is loaded."),
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
        context = _empty_context(model, empty_prompt)
        device = mm.get_torch_device()
        progress = Progress(samples.shape[0])
        key = plan_key(model, samples, context, params, [feature_timestep, ensemble], device)

        def compute() -> KeyframePlan:
            patcher, featurize = make_featurizer(model, context, feature_timestep)
            per_frame = patcher.memory_required([ensemble, *samples.shape[1:]])
            mm.load_models_gpu([patcher], memory_required=per_frame)
            chunk = frames_per_chunk(mm.get_free_memory(device), per_frame, 1)
            options = scale_options(model.model_options)  # Spread Edit over GPUs on this MODEL
            spread = None if options is None else features_spread(options, model, context, feature_timestep,
                                                                   progress.check)
            if spread is not None:  # a few chunks per actor, so that they finish together
                chunk = dispatch_frames(samples.shape[0], options.workers, chunk)

            def features():
                for part in dift_feature_chunks(samples, featurize, ensemble, seed, chunk, spread=spread):
                    part = part.to(device)  # from the actors: on the host
                    progress.check()
                    yield part

            folder = os.path.join(scratch_dir(), f"keyframes_{uuid.uuid4().hex[:12]}")
            return select_keyframes(features(), samples, params, folder=folder, device=device,
                                    on_frames=progress.update)

        plan = cached_or_selected(StageCache(cache_dir(), CACHE_LIMIT_BYTES), key, compute)
        progress.update(progress.total)
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
