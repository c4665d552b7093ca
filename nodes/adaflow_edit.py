"""AdaFlow Keyframe Editing: MODEL -> MODEL patch running AdaFlow's keyframe pass at every sampling step."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile

import comfy.model_management as mm
import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
from comfy_api.latest import io

from ..core.adaflow.attention import adaflow_self_attention
from ..core.adaflow.edit import FeatureInjection, KeyframeEditor
from ..core.adaflow.sampling import euler_by_passes, passes_of_step
from ..core.adaflow.slimming import effective_slimming
from ..core.resume import Fingerprint, StepStore
from ..core.errors import LongEditError
from ..core.memory import frames_per_chunk
from ..core.adaflow.records import ROWS
from ..core.run_plan import PASS_BY_PASS_COPIES, SAMPLER_COPIES, GpuPlan, RunPlan, available_ram, check_gpu
from ..core.schedule import step_index
from .adaflow_invert import InversionType
from .adaflow_keyframes import KeyframesType
from .comfy_glue import Progress, card_memory, check_sd_unet, resume_dir, scratch_dir
from ..core.scale.pool import dispatch_frames
from .scale import finish_pool, records_payload, scale_options, start_pool

WRAPPER_KEY = "longedit_adaflow"
SPANNED_CLIPS = 2  # clips one chunk of (sorted) frames spans, but for chunks longer than a clip
LEVEL_LAYERS = 5  # self-attention layers per level of SD's UNet (2 down, 3 up): one layer's stacked rows
PNP_ATTENTION_FROM_OUTPUT_BLOCK = 4  # TokenFlow/PnP: decoder self-attention from up_blocks[1].attentions[1] on
PNP_FEATURE_MODULE = "diffusion_model.output_blocks.4.0.out_layers"  # up_blocks[1].resnets[1], before the skip


def transformer_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """(block name, number, transformer index) of every self-attention layer of a ComfyUI UNetModel."""
    found = []
    for name, blocks in (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
                         ("output", diffusion_model.output_blocks)):
        for number, block in enumerate(blocks):
            for module in block:
                if isinstance(module, SpatialTransformer):
                    found += [(name, number, i) for i in range(len(module.transformer_blocks))]
    return found


def make_attn1_replace(block: tuple[str, int, int], previous):
    pnp_layer = block[0] == "output" and block[1] >= PNP_ATTENTION_FROM_OUTPUT_BLOCK

    def per_frame(q, k, v, heads, extra_options):
        if previous is not None:  # another pack's replace keeps doing the per-frame attention
            return previous(q, k, v, extra_options)
        return optimized_attention(q, k, v, heads)

    def replace(q, k, v, extra_options):
        layout = extra_options.get(WRAPPER_KEY)
        heads = extra_options["n_heads"]
        if layout is None:
            return per_frame(q, k, v, heads, extra_options)
        return adaflow_self_attention(q, k, v, heads, layout, pnp_layer,
                                      lambda q_, k_, v_, h_: per_frame(q_, k_, v_, h_, extra_options), layer=block)

    return replace


CONFIG_KEY = "longedit_adaflow_config"


def adaflow_settings(model) -> dict:
    """The AdaFlow settings already on this MODEL (from Keyframe Editing and/or Latent Propagation)."""
    holder = model.model_options.get("transformer_options", {}).get(CONFIG_KEY)
    return dict(holder()["settings"]) if holder is not None else {}


def with_adaflow(model, **settings):
    """A clone of `model` with AdaFlow settings merged in and AdaFlow's hooks installed (once).

    The settings live behind a function in transformer_options: ComfyUI deep-copies model options on every
    clone, and a function is copied as itself, so the trajectory and keyframe plan are never duplicated.
    Because each node only merges its own settings, Keyframe Editing and Latent Propagation give the same
    model in either order."""
    check_sd_unet(model, "AdaFlow Keyframe Editing / Latent Propagation")
    patched = model.clone()
    state = {"settings": {**adaflow_settings(model), **settings}, "editor": None,
             "latent_out": model.model.process_latent_out}
    patched.model_options.setdefault("transformer_options", {})[CONFIG_KEY] = lambda: state
    if WRAPPER_KEY not in patched.wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}):
        install_hooks(patched)
    # ComfyUI decides from this cost whether cond and uncond share a model call; a batch of all frames costs
    # its largest pass. Re-patched on every clone: it reads this clone's settings.
    current = patched.get_model_object("memory_required")
    full_cost = getattr(current, "full_cost", current)
    patched.add_object_patch("memory_required", pass_memory_required(full_cost, state))
    return patched


def editor_for(state: dict) -> KeyframeEditor:
    if state["editor"] is None:
        s = state["settings"]
        if "inversion" not in s:
            present = [name for key, name in (("propagate", "AdaFlow Latent Propagation"),
                                              ("slimming", "AdaFlow Attention Slimming")) if s.get(key) is not None]
            raise LongEditError(f"{' and '.join(present) or 'This model'} {'need' if len(present) > 1 else 'needs'} "
                                "AdaFlow Keyframe Editing on the same MODEL.",
                                "add AdaFlow Keyframe Editing to the model chain (before or after it).")
        plan, propagate = s.get("keyframes"), s.get("propagate")
        if plan is not None and propagate is not None and plan is not propagate:
            raise LongEditError("Keyframe Editing and Latent Propagation got different keyframe selections.",
                                "connect the same AdaFlow Keyframe Selection output to both.")
        plan = plan if plan is not None else propagate
        inversion = s["inversion"]
        if plan is not None:  # the plan must describe these very frames, in this order
            plan.check_latents(state["latent_out"](inversion.latents_at(inversion.steps)))
        slimming = effective_slimming(s)  # the Attention Slimming node's, else AAS with kv_budget
        state["editor"] = KeyframeEditor(inversion, plan, s["pnp_attn_t"], s["pnp_f_t"], slimming.kv_budget,
                                         propagate=propagate is not None, slimming=slimming)
    return state["editor"]


def install_hooks(patched) -> None:
    """attn1 replaces on every self-attention layer, PnP's feature injection, the keyframe-pass wrapper, and
    the wrappers that keep a long video's sampling state on the host and size ComfyUI's load from the passes."""
    current = {"layout": None}

    def apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if control is not None or c_concat is not None or kwargs:
            raise LongEditError("AdaFlow Keyframe Editing does not yet combine with ControlNet or concat/extra "
                                "conditionings.", "remove the ControlNet/inpainting conditioning from this graph.")
        state = transformer_options[CONFIG_KEY]()
        editor = editor_for(state)
        branch_ids = list(transformer_options.get("cond_or_uncond", [0]))
        branches = len(branch_ids)
        if len(set(branch_ids)) < branches:  # several conds of one kind: name the branches by position
            branch_ids = list(range(branches))
        # The model runs on its load device even when the sampler keeps the latents on the host. Non-keyframes
        # run in chunks sized from that device's free memory: each frame costs branches + source.
        editor.device = patched.load_device
        editor.chunk_frames = chunk_size(patched, branches, x.shape[1:])
        call_frames = state.get("call_frames")  # set by the pass-by-pass sampler, which owns the progress bar
        editor.on_progress = frame_progress(transformer_options) if call_frames is None else None

        def run(x_in, sigma, context, layout):
            options = dict(transformer_options)
            options[WRAPPER_KEY] = layout
            current["layout"] = layout
            try:
                return executor(x_in, sigma, None, context, None, options)
            finally:
                current["layout"] = None

        return editor(run, x, t, c_crossattn, branches, frames_idx=call_frames, branch_ids=branch_ids)

    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for block in transformer_blocks(patched.model.diffusion_model):
        previous = existing.get(block) or existing.get(block[:2])
        patched.set_model_attn1_replace(make_attn1_replace(block, previous), *block)
    original = patched.get_model_object(PNP_FEATURE_MODULE)
    patched.add_object_patch(PNP_FEATURE_MODULE, FeatureInjection(original, lambda: current["layout"]))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    # ComfyUI sizes the weights it keeps on the GPU from the sampler batch's cost; with a keyframe plan the
    # model only ever sees one pass at a time, so the load follows the largest pass instead.
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY,
                                 prepare_for_largest_pass)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sample_on_host)


def _adaflow_state(model_options: dict) -> dict | None:
    holder = (model_options or {}).get("transformer_options", {}).get(CONFIG_KEY)
    return holder() if holder is not None else None


def largest_pass_frames(settings: dict, batch: int) -> int:
    """Images in the one model call AdaFlow cannot shrink for a sampler batch of `batch` latents: the keyframe
    pass, run one branch at a time (source + branch: 2 x keyframes); chunks of other frames fit what is free.
    Without a keyframe plan every frame is a keyframe: the batch itself."""
    plan = settings.get("keyframes") or settings.get("propagate")
    inversion = settings.get("inversion")
    if plan is None or inversion is None or batch < inversion.frame_count:
        return batch  # already one pass (or not an AdaFlow batch)
    return 2 * plan.clip_count


def pass_memory_required(full_cost, state: dict):
    """BaseModel.memory_required as the patched model needs it: a sampler batch of all frames costs its
    largest pass, not all frames at once."""

    def memory_required(input_shape, cond_shapes=None):
        frames = largest_pass_frames(state["settings"], int(input_shape[0]))
        return full_cost([frames, *input_shape[1:]], cond_shapes=cond_shapes or {})

    memory_required.full_cost = full_cost
    return memory_required


def prepare_for_largest_pass(executor, model, noise_shape, conds, model_options=None):
    """ComfyUI loads the weights so that the sampler batch's estimated activations stay free, offloading
    weights when they would not (its low-VRAM mode). Ask for the keyframe pass as the minimum, so a long
    video neither forces weights off nor loads past the card."""
    state = _adaflow_state(model_options)
    if state is not None:
        frames = largest_pass_frames(state["settings"], 2 * int(noise_shape[0]))
        if frames < 2 * int(noise_shape[0]):
            noise_shape = [frames, *noise_shape[1:]]
    return executor(model, noise_shape, conds, model_options=model_options)


def chunk_size(model, branches: int, latent_shape) -> int:
    """Frames of a non-keyframe pass that fit the model device's free memory (each costs branches + source)."""
    per_frame = model.memory_required([branches + 1, *latent_shape])
    return frames_per_chunk(mm.get_free_memory(model.load_device), per_frame, 1)


def sample_on_host(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                   disable_pbar=False, seed=None):
    """ComfyUI's outer sampling, with a long video's latents kept in RAM when a keyframe plan is used.

    ComfyUI moves the noise and the latents of all frames to the GPU and its sampler keeps ~16 full-batch
    copies; here they stay on the host and only each pass's frames travel to the GPU, so GPU memory does not
    grow with the number of frames. With Euler/DDIM (AdaFlow's sampler) the step is taken pass by pass on
    one state tensor (core/adaflow/sampling.py), so RAM holds ~4 copies of the latents instead of ~16; other
    samplers run their own loop on the host tensors."""
    guider = executor.class_obj
    state = _adaflow_state(guider.model_options)
    settings = state["settings"] if state is not None else {}
    if settings.get("keyframes") is None and settings.get("propagate") is None:
        return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
    import comfy.sampler_helpers as helpers
    import comfy.samplers

    # ComfyUI's outer_sample, less the moves of the full-batch tensors to the model's device
    guider.inner_model, guider.conds, guider.loaded_models = helpers.prepare_sampling(
        guider.model_patcher, noise.shape, guider.conds, guider.model_options)
    device = guider.model_patcher.load_device
    host = torch.device("cpu")
    noise, latent_image, sigmas = noise.to(host), latent_image.to(host), sigmas.to(host)
    if denoise_mask is not None:
        denoise_mask = helpers.prepare_mask(denoise_mask, noise.shape, host)
    comfy.samplers.cast_to_load_options(guider.model_options, device=device, dtype=guider.model_patcher.model_dtype())
    editor = editor_for(state)
    plan = card_plan(guider.model_patcher, editor.inversion, editor.plan)
    logging.info(plan.describe())
    records = tempfile.mkdtemp(prefix="records_", dir=scratch_dir()) if plan.records_on_disk else None
    editor.record_folder = records
    try:
        guider.model_patcher.pre_run()
        if streamable(sampler, denoise_mask):
            output = sample_by_passes(guider, state, noise, latent_image, sampler, sigmas, device, callback, seed)
        else:
            output = guider.inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                         disable_pbar, seed)
    finally:
        guider.model_patcher.cleanup()
        editor.records = None  # the record (pinned RAM or files) is per run
        if records is not None:
            shutil.rmtree(records, ignore_errors=True)
    helpers.cleanup_models(guider.conds, guider.loaded_models)
    del guider.inner_model
    del guider.loaded_models
    return output


def streamable(sampler, denoise_mask) -> bool:
    """Euler without churn (ComfyUI's "euler" and "ddim"), no inpainting mask: a step is taken frame by frame."""
    import comfy.k_diffusion.sampling as k_sampling

    return (getattr(sampler, "sampler_function", None) is k_sampling.sample_euler
            and not getattr(sampler, "extra_options", None) and denoise_mask is None)


def sample_by_passes(guider, state: dict, noise, latent_image, sampler, sigmas, device, callback, seed):
    """ComfyUI's inner_sample and KSAMPLER.sample for Euler, a step taken one pass of frames at a time."""
    import comfy.model_patcher
    import comfy.samplers

    model = guider.inner_model
    guider.conds = comfy.samplers.process_conds(model, noise, guider.conds, device, latent_image, None, seed)
    options = comfy.model_patcher.create_model_options_clone(guider.model_options)
    options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
    x = start_state(model, noise, latent_image, sigmas[0], sampler.max_denoise(guider, sigmas))
    editor = editor_for(state)
    frames, steps = x.shape[0], len(sigmas) - 1
    store = StepStore(resume_dir(), RESUME_LIMIT_BYTES)
    key = run_key(guider, state, noise, latent_image, sigmas, sampler, seed)
    saved = store.load(key, x)
    first_step = 0
    if saved is not None and saved.steps == steps:
        x, first_step = saved.state, saved.step + 1
        logging.info(f"LongEdit: resuming at step {first_step + 1} of {steps} (an earlier run of this edit saved "
                     f"the state after step {saved.step + 1})" if first_step < steps else
                     f"LongEdit: an earlier run of this edit completed all {steps} steps: using its saved result")
    branches = sum(1 for key in ("positive", "negative") if guider.conds.get(key))
    progress = Progress(steps * frames)

    pool = spread_pool(guider, state, options, seed, progress.check) if first_step < steps else None

    def passes(step: int):
        sigma = float(sigmas[step])
        chunk = chunk_size(guider.model_patcher, branches, x.shape[1:])
        keyframes = editor.keyframes(editor.inversion.step_of(sigma))
        if pool is not None:  # chunks for the actors (each splits its chunk again to fit its own memory)
            chunk = dispatch_frames(frames - len(keyframes), len(pool.live), chunk)
        return passes_of_step(frames, keyframes, chunk)

    def denoise(group, current, sigma):
        state["call_frames"] = group
        try:
            return guider(current, sigma, model_options=options, seed=seed)
        finally:
            state["call_frames"] = None

    def on_pass(step: int, done: int) -> None:
        progress.check()
        progress.update(step * frames + done)

    def on_step(step, group, denoised, current):  # ComfyUI's preview and step bar: the step's keyframes
        store.save(key, step, steps, x)  # before anything else: a Cancel from here on loses no step
        if callback is not None:
            callback(step, denoised, current, steps)

    if first_step and callback is not None:
        progress.update(first_step * frames)
    completed = False
    try:
        spread = None if pool is None else (lambda step, groups, inputs: pool.denoise_chunks(
            step, records_payload(editor), groups, inputs, progress.check))
        x = euler_by_passes(x, sigmas, denoise, passes, on_pass, on_step, first_step=first_step, spread=spread)
        completed = True
    finally:
        if pool is not None:
            finish_pool(pool, completed)
    for rows in frame_blocks(frames):  # ComfyUI's output transforms, block by block in place: no second copy
        x[rows] = model.process_latent_out(model.model_sampling.inverse_noise_scaling(sigmas[-1], x[rows]))
    return x


def spread_pool(guider, state: dict, options: dict, seed, check):
    """Ray actors for this run's propagation chunks when Spread Edit over GPUs asked for more than one, else None.
    Without a keyframe plan every frame is a keyframe: one joint pass per step, nothing to spread. `check` raises
    on Cancel."""
    scale = scale_options(options)
    editor = editor_for(state)
    if scale is None or editor.plan is None:
        return None
    plan = card_plan(guider.model_patcher, editor.inversion, editor.plan)  # this process's keyframe passes
    return start_pool(scale, guider, options, seed, CONFIG_KEY, driver_peak=plan.gpu.peak_bytes, check=check)


RESUME_LIMIT_BYTES = 64 * 2**30  # saved sampling states kept in all; the oldest other runs' go first
WEIGHT_SAMPLE = 64  # elements hashed per weight tensor: tells checkpoints and patches apart cheaply


def run_key(guider, state: dict, noise, latent_image, sigmas, sampler, seed) -> str:
    """A digest of everything that determines this sampling run's states: the latents and noise, the
    schedule, sampler, guidance and seed, the conditioning, the model's weights and weight patches (LoRAs),
    and the AdaFlow inputs (inversion, keyframe plan, settings)."""
    fp = Fingerprint().add("LongEdit sampling state v1")
    fp.add([latent_image, noise, sigmas, seed, guider.cfg, getattr(sampler.sampler_function, "__name__", ""),
            dict(getattr(sampler, "extra_options", {}))])
    for name in sorted(guider.original_conds):
        fp.add([name, [plain_value({k: v for k, v in c.items() if k != "uuid"}) for c in guider.original_conds[name]]])
    patcher = guider.model_patcher
    fp.add(type(patcher.model.model_config).__name__)
    for name, weight in patcher.model.diffusion_model.state_dict().items():
        fp.add(name).add(weight, sample=WEIGHT_SAMPLE)
    fp.add(plain_value(patcher.patches), sample=WEIGHT_SAMPLE)
    settings = state["settings"]
    inversion = settings["inversion"]
    fp.add([inversion.sigmas, inversion.source_context]).add(inversion.trajectory, sample=4096)
    plan = settings.get("keyframes") or settings.get("propagate")
    if plan is not None:
        fp.add([plan.clip_starts, plan.candidates, plan.levels, repr(plan.params)])
        fp.add(plan.matches, sample=4096).add(plan.aas_scores, sample=4096)
    fp.add([settings.get(k) for k in ("pnp_attn_t", "pnp_f_t", "kv_budget")] + [settings.get("propagate") is not None])
    fp.add(repr(effective_slimming(settings)))
    return fp.hex()


def plain_value(value):
    """Conditioning entries and weight patches as tensors, lists and numbers: ComfyUI wraps them in objects
    (CONDRegular's .cond, a LoRA adapter's .weights) that a digest cannot read otherwise."""
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    for attribute in ("cond", "weights"):
        if hasattr(value, attribute) and not isinstance(value, torch.Tensor):
            return [type(value).__name__, plain_value(getattr(value, attribute))]
    return value


def frame_blocks(frames: int, block: int = 256):
    return [slice(i, min(i + block, frames)) for i in range(0, frames, block)]


def start_state(model, noise, latent_image, sigma, max_denoise: bool) -> torch.Tensor:
    """The sampler's first state (ComfyUI: noise_scaling(sigma, noise, process_latent_in(latent))), built block
    by block into one tensor, so no full-batch intermediate exists beside it."""
    shift = any(torch.count_nonzero(latent_image[rows]) > 0 for rows in frame_blocks(len(latent_image)))
    x = torch.empty(noise.shape, dtype=noise.dtype)
    for rows in frame_blocks(len(noise)):
        latent = model.process_latent_in(latent_image[rows]) if shift else latent_image[rows]  # as ComfyUI
        x[rows] = model.model_sampling.noise_scaling(sigma, noise[rows], latent, max_denoise)
    return x


def frame_progress(transformer_options: dict):
    """Between chunks of a step: stop if Cancel was pressed, and move a bar over steps x frames, which shows
    the same fraction as the sampler's own step bar at each step's end."""
    schedule = transformer_options.get("sample_sigmas")
    steps = max(1, len(schedule) - 1) if schedule is not None else 1
    step = min(step_index(transformer_options), steps - 1)
    progress = None

    def report(done: int, frames: int) -> None:
        nonlocal progress
        progress = progress or Progress(steps * frames)
        progress.check()
        progress.update(step * frames + done)

    return report


def patch_model(model, inversion, keyframes, pnp_attn_t: float, pnp_f_t: float, kv_budget: int):
    """Keyframe Editing: a clone of `model` whose every sampling call runs AdaFlow's keyframe pass."""
    check_sd_unet(model, "AdaFlow Keyframe Editing")
    patched = with_adaflow(model, inversion=inversion, keyframes=keyframes, pnp_attn_t=pnp_attn_t,
                           pnp_f_t=pnp_f_t, kv_budget=kv_budget)
    editor_for(patched.model_options["transformer_options"][CONFIG_KEY]())  # check the inputs now, not mid-sampling
    return patched


class AdaFlowKeyframeEditing(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LongEditAdaFlowKeyframeEditing",
            display_name="AdaFlow Keyframe Editing",
            category="LongEdit/adaflow",
            description=(
                "Patches the MODEL so that each sampling step edits the keyframes jointly: every keyframe attends "
                "to the tokens of all keyframes (extended attention), slimmed to a budget by Adaptive Attention "
                "Slimming; an unedited source branch replays the inversion and injects its structure "
                "(plug-and-play). Use the patched MODEL in KSamplerAdvanced with the inverted LATENT."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x/SD2.x MODEL (the same one AdaFlow Invert used)."),
                InversionType.Input("inversion", tooltip="From AdaFlow Invert."),
                KeyframesType.Input("keyframes", optional=True,
                                    tooltip="From AdaFlow Keyframe Selection. Without it every frame is a keyframe "
                                            "(fine for short clips; long videos need keyframes and propagation)."),
                io.Float.Input("pnp_attn_t", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps (from the first) in which the decoder's self-attention "
                                       "q/k come from the source video: more keeps more structure."),
                io.Float.Input("pnp_f_t", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps in which the decoder's residual features come from "
                                       "the source video."),
                io.Int.Input("kv_budget", default=20, min=1, max=10_000,
                             tooltip="Keyframes whose full K/V every keyframe attends to. With more keyframes, AAS "
                                     "keeps for each keyframe this many frames' worth of the most similar tokens. "
                                     "An AdaFlow Attention Slimming node on the same MODEL (before or after this "
                                     "one) overrides it with its own policy and budget."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, inversion, pnp_attn_t, pnp_f_t, kv_budget, keyframes=None) -> io.NodeOutput:
        patched = patch_model(model, inversion, keyframes, pnp_attn_t, pnp_f_t, kv_budget)
        summary = describe_edit(model, inversion, keyframes)
        logging.info(summary)
        return io.NodeOutput(patched, ui={"text": [summary]})


def self_attention_bytes_per_frame(diffusion_model, levels: list[tuple[int, int]], dtype_size: int) -> int:
    """Bytes of one frame's self-attention outputs over every layer: what a keyframe pass keeps, per frame and
    branch, for propagation. The token grid of a layer follows the down/upsamplers met before it."""
    total, level = 0, 0

    def add(block, level):
        h, w = levels[min(level, len(levels) - 1)]
        return sum(h * w * m.in_channels * len(m.transformer_blocks) for m in block if isinstance(m, SpatialTransformer))

    for block in diffusion_model.input_blocks:
        level += sum(isinstance(m, Downsample) for m in block)
        total += add(block, level)
    total += add(diffusion_model.middle_block, level)
    for block in diffusion_model.output_blocks:
        total += add(block, level)
        level -= sum(isinstance(m, Upsample) for m in block)
    return total * dtype_size


RECORD_RAM_SHARE = 0.25  # keyframe records larger than this share of the available RAM go to disk


def card_plan(model, inversion, keyframes) -> RunPlan:
    """The sampling stage's memory plan on the card ComfyUI runs the model on: what stays on the GPU (as much
    of the weights as fit, the largest pass, the keyframe records of the clips a chunk spans), in RAM and on
    disk."""
    frames = inversion.frame_count
    shape = tuple(inversion.trajectory.shape[2:])
    keys = keyframes.clip_count if keyframes is not None else frames
    device = model.load_device
    base = model.model
    full_cost = getattr(model.get_model_object("memory_required"), "full_cost", base.memory_required)
    on_device = record = 0
    if keyframes is not None:
        per_frame = self_attention_bytes_per_frame(base.diffusion_model, keyframes.levels,
                                                   mm.dtype_size(model.model_dtype()))
        record = ROWS * keys * per_frame  # source, uncond and cond outputs of every keyframe, off the GPU
        # a chunk spans SPANNED_CLIPS clips; their records are copied over, then one layer's rows stacked
        on_device = ROWS * min(keys, SPANNED_CLIPS) * per_frame + ROWS * SPANNED_CLIPS * per_frame // LEVEL_LAYERS
    total, outside = card_memory(device)
    gpu = GpuPlan(card_bytes=total, reserved_bytes=outside + mm.extra_reserved_memory(),
                  weights_bytes=model.model_size(),
                  pass_bytes=int(full_cost([(2 if keyframes is not None else 3) * keys, *shape])),
                  recorded_bytes=int(on_device))
    # non-keyframe chunks take what the card has free at sampling time (the sampler sizes them so)
    per_chunk_frame = full_cost([3, *shape])
    chunk = frames_per_chunk(total - outside - gpu.weights_on_gpu - on_device, per_chunk_frame, 1)
    gpu = dataclasses.replace(gpu, chunk_pass_bytes=int(chunk * per_chunk_frame)) if keyframes is not None else gpu
    ram = available_ram()
    return RunPlan(frames=frames, latent_shape=shape, steps=inversion.steps,
                   clips=keys if keyframes is not None else None,
                   per_clip=keyframes.per_clip if keyframes is not None else 0,
                   attention_tokens=sum(h * w for h, w in keyframes.levels) if keyframes is not None else 0,
                   chunk_frames=chunk if keyframes is not None else None, gpu=gpu,
                   sampler_copies=PASS_BY_PASS_COPIES if keyframes is not None else SAMPLER_COPIES,
                   record_bytes=int(record),
                   records_on_disk=ram is not None and record > RECORD_RAM_SHARE * ram)


def describe_edit(model, inversion, keyframes) -> str:
    """The run's memory plan in words (frames, keyframes, chunking, GPU / RAM / disk); refuses, with the
    numbers, an edit whose keyframe pass cannot fit the card."""
    plan = card_plan(model, inversion, keyframes)
    check_gpu(plan)
    return plan.describe()
