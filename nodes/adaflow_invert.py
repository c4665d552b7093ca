"""AdaFlow Invert: DDIM inversion of the video latents, keeping the whole trajectory on disk."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid

import numpy as np
import torch

import comfy.model_management as mm
import comfy.samplers
from comfy_api.latest import io

from ..core.adaflow import inversion as inversion_module
from ..core.errors import LongEditError
from ..core.adaflow.inversion import Inversion, ddim_invert, inversion_grid
from ..core.memory import frames_per_chunk
from ..core.resume import Fingerprint
from ..core.run_plan import RunPlan, check_resources
from ..core.scale.pool import dispatch_frames
from ..core.stage_cache import CachedStage, StageCache, source_digest
from .scale import inversion_spread, scale_options
from .comfy_glue import CACHE_LIMIT_BYTES, Progress, add_model_identity, cache_dir, check_sd_unet, scratch_dir

InversionType = io.Custom("LONGEDIT_INVERSION")


def inversion_schedule(model_sampling, scheduler: str, steps: int, inversion_steps: int):
    """(the sampler's sigmas, the inversion grid): the grid starts where the reference takes the clean latent
    to sit, sigma at t=0 (alpha_bar_0, DDIMScheduler's final_alpha_cumprod with set_alpha_to_one False),
    and merges the sampler's sigmas into `inversion_steps` steps of the same scheduler."""
    sampler = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu().double().numpy()
    finer = comfy.samplers.calculate_sigmas(model_sampling, scheduler, inversion_steps).cpu().double().numpy()
    return sampler, inversion_grid(sampler, finer, float(model_sampling.sigma_min))


def make_eps(model, context: torch.Tensor):
    """eps(x, sigma): the MODEL's noise estimate (with its own patches) for sampler-space latents."""
    base = model.model
    device = mm.get_torch_device()
    options = model.model_options.get("transformer_options", {})

    @torch.no_grad()
    def eps(x: torch.Tensor, sigma: float) -> torch.Tensor:
        x = x.to(device)
        s = torch.full((x.shape[0],), sigma, device=device)
        denoised = base.apply_model(x, s, c_crossattn=context.to(device).expand(x.shape[0], -1, -1),
                                    transformer_options=dict(options))
        return ((x - denoised) / sigma).float()

    return eps


STAGE = "inversion"


def inversion_key(model, samples: torch.Tensor, context: torch.Tensor, sigmas, grid, settings: list, device) -> str:
    """A digest of everything that determines the inversion: the latents, the model, the source conditioning,
    the schedule it walks, the node's settings, the device kind (GPU and CPU round differently) and the code."""
    fp = Fingerprint().add("LongEdit inversion v1").add(source_digest(inversion_module, sys.modules[__name__]))
    add_model_identity(fp, model)
    fp.add([samples, context, sigmas, grid, settings, torch.device(device).type])
    return fp.hex()


def inversion_arrays(inversion: Inversion) -> dict:
    start = inversion.trajectory[0] if inversion.start is None else inversion.start
    arrays = {"trajectory": inversion.trajectory, "start": start, "sigmas": inversion.sigmas,
              "source_context": inversion.source_context}
    return arrays if inversion.grid is None else {**arrays, "grid": inversion.grid}


def inversion_from(cached: CachedStage) -> Inversion:
    """The cached inversion, its trajectory and start latents memory-mapped from the cache file."""
    a = cached.arrays
    return Inversion(sigmas=np.array(a["sigmas"]), trajectory=a["trajectory"], source_context=a["source_context"],
                     path=cached.path, start=a["start"], grid=np.array(a["grid"]) if "grid" in a else None)


def cached_or_computed(cache: StageCache, key: str, compute) -> Inversion:
    """The inversion saved by an earlier run under `key`, or compute() saved for the next one. A trajectory
    computed into the scratch folder is then read from the cache file, and its scratch copy removed."""
    cached = cache.load(STAGE, key)
    if cached is not None:
        logging.info("LongEdit: AdaFlow Invert: using the inversion saved by an earlier run")
        return inversion_from(cached)
    inversion = compute()
    path = cache.save(STAGE, key, inversion_arrays(inversion), {"steps": inversion.steps})
    if path is not None and inversion.path is not None:
        saved = cache.load(STAGE, key, verify=False)
        if saved is not None:
            shutil.rmtree(os.path.dirname(inversion.path), ignore_errors=True)
            return inversion_from(saved)
    return inversion


class AdaFlowInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditAdaFlowInvert",
            display_name="AdaFlow Invert (DDIM)",
            category="LongEdit/adaflow",
            description=(
                "DDIM-inverts the video latents as AdaFlow/TokenFlow do (a finer grid, by default 100 steps, the "
                "clean latent at t=0) and keeps the latent at every step of the sampler's schedule (float16, on "
                "disk under ComfyUI's user directory, longedit/cache, so that queueing the same inversion again, "
                "even after a restart, loads it instead of computing it): the source branch of the edit replays it for "
                "plug-and-play structure injection. Sample the output LATENT with KSamplerAdvanced "
                "(add_noise disable, same steps and scheduler, start_at_step 0, sampler ddim or euler)."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x/SD2.x MODEL of the edit (AdaFlow uses SD2.1-base)."),
                io.Latent.Input("latent", tooltip="The video latents from Encode Video (LongEdit)."),
                io.Conditioning.Input("source_prompt",
                                      tooltip="Conditioning of the source video: CLIP Text Encode with an empty "
                                              "prompt (as AdaFlow) or a description of the original video."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Sampling steps; KSamplerAdvanced must use the same number."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform",
                               tooltip="Sigma schedule; KSamplerAdvanced must use the same one."),
                io.Int.Input("inversion_steps", default=100, min=1, max=1000,
                             tooltip="DDIM inversion steps (AdaFlow: 100). The sampler's own sigmas are "
                                     "always visited too; more steps invert more exactly, at their cost."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The inverted latents: sample from these."),
                InversionType.Output(display_name="inversion",
                                     tooltip="The trajectory and its sigmas, for AdaFlow Keyframe Editing."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, source_prompt, steps, scheduler, inversion_steps=100) -> io.NodeOutput:
        check_sd_unet(model, "AdaFlow Invert")
        samples = latent["samples"]
        if samples.ndim != 4:
            raise LongEditError(f"Expected one latent per frame [frames, c, h, w], got {tuple(samples.shape)}.",
                                "connect the output of Encode Video (LongEdit).")
        base = model.model
        sigmas, grid = inversion_schedule(base.model_sampling, scheduler, steps, inversion_steps)
        context = source_prompt[0][0][:1].float()
        progress = Progress(samples.shape[0] * (len(grid) - 1))
        key = inversion_key(model, samples, context, sigmas, grid, [steps, scheduler, inversion_steps],
                            mm.get_torch_device())

        def compute() -> Inversion:
            folder = os.path.join(scratch_dir(), f"inversion_{uuid.uuid4().hex[:12]}")
            plan = RunPlan(frames=samples.shape[0], latent_shape=tuple(samples.shape[1:]), steps=steps)
            check_resources(plan, scratch_dir())  # refuse up front, with the numbers
            logging.info(plan.describe())
            per_frame = model.memory_required([1, *samples.shape[1:]])
            mm.load_models_gpu([model], memory_required=per_frame)
            chunk = frames_per_chunk(mm.get_free_memory(mm.get_torch_device()), per_frame, 1)

            def on_progress(done: int) -> None:
                progress.check()
                progress.update(done)

            options = scale_options(model.model_options)  # Spread Edit over GPUs on this MODEL
            spread = None if options is None else inversion_spread(options, model, context, progress.check)
            if spread is not None:  # a few chunks per actor, so that they finish together
                chunk = dispatch_frames(samples.shape[0], options.workers, chunk)
            return ddim_invert(base.process_latent_in(samples.float()), sigmas, make_eps(model, context), chunk,
                               folder=folder, source_context=context, on_progress=on_progress,
                               device=mm.get_torch_device(), grid=grid, spread=spread)

        inversion = cached_or_computed(StageCache(cache_dir(), CACHE_LIMIT_BYTES), key, compute)
        progress.update(progress.total)
        start = base.process_latent_out(inversion.start_latents())
        return io.NodeOutput({"samples": start}, inversion)
